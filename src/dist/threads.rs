//! Ranks as threads of one process, over channels: the data-parallel code paths (the rank-order
//! chain, the all-gathers, a trainer's shares) exercised without MPI, in tests and by a program
//! that wants several ranks inside one process.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Mutex;

use super::Communicator;
use crate::error::{Error, Result};

/// One rank of [`ranks`]; move each to its own thread.
pub struct ThreadRank {
    rank: usize,
    /// `to[q]`: the channel to rank q.
    to: Vec<Sender<Vec<u8>>>,
    /// `from[q]`: what rank q sent to this one, in order.
    from: Vec<Mutex<Receiver<Vec<u8>>>>,
}

/// `world` ranks, every pair joined by a channel each way.
pub fn ranks(world: usize) -> Vec<ThreadRank> {
    // senders[to][from] and receivers[to][from]: the channel from `from` to `to`.
    let mut senders: Vec<Vec<Sender<Vec<u8>>>> = (0..world).map(|_| Vec::new()).collect();
    let mut receivers: Vec<Vec<Mutex<Receiver<Vec<u8>>>>> = (0..world).map(|_| Vec::new()).collect();
    for to in 0..world {
        for _from in 0..world {
            let (tx, rx) = channel();
            senders[to].push(tx);
            receivers[to].push(Mutex::new(rx));
        }
    }
    (0..world)
        .map(|rank| ThreadRank {
            rank,
            to: (0..world).map(|to| senders[to][rank].clone()).collect(),
            from: std::mem::take(&mut receivers[rank]),
        })
        .collect()
}

impl Communicator for ThreadRank {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.to.len()
    }

    fn name(&self) -> String {
        format!("{} threads", self.to.len())
    }

    fn send(&self, to: usize, bytes: &[u8]) -> Result<()> {
        self.to
            .get(to)
            .ok_or_else(|| Error::Other(format!("no rank {to} to send to")))?
            .send(bytes.to_vec())
            .map_err(|_| Error::Other(format!("rank {to} has stopped")))
    }

    fn recv(&self, from: usize, bytes: &mut [u8]) -> Result<()> {
        let got = self
            .from
            .get(from)
            .ok_or_else(|| Error::Other(format!("no rank {from} to receive from")))?
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .recv()
            .map_err(|_| Error::Other(format!("rank {from} has stopped")))?;
        if got.len() != bytes.len() {
            return Err(Error::Other(format!(
                "rank {from} sent {} bytes, {} expected",
                got.len(),
                bytes.len()
            )));
        }
        bytes.copy_from_slice(&got);
        Ok(())
    }

    fn broadcast(&self, root: usize, bytes: &mut [u8]) -> Result<()> {
        if self.rank == root {
            (0..self.world_size())
                .filter(|&r| r != root)
                .try_for_each(|r| self.send(r, bytes))
        } else {
            self.recv(root, bytes)
        }
    }

    fn all_gather(&self, mine: &[u8], counts: &[usize]) -> Result<Vec<u8>> {
        (0..self.world_size())
            .filter(|&r| r != self.rank)
            .try_for_each(|r| self.send(r, mine))?;
        let mut out = Vec::with_capacity(counts.iter().sum());
        for (r, &count) in counts.iter().enumerate() {
            if r == self.rank {
                out.extend_from_slice(mine);
            } else {
                let mut b = vec![0u8; count];
                self.recv(r, &mut b)?;
                out.extend(b);
            }
        }
        Ok(out)
    }

    fn barrier(&self) -> Result<()> {
        // Everyone sends rank 0 a token; rank 0 answers when it has them all.
        let mut token = [0u8; 1];
        if self.rank == 0 {
            for r in 1..self.world_size() {
                self.recv(r, &mut token)?;
            }
            (1..self.world_size()).try_for_each(|r| self.send(r, &token))
        } else {
            self.send(0, &token)?;
            self.recv(0, &mut token)
        }
    }

    /// Threads cannot stop each other: the caller returns its error, and a rank waiting on it
    /// fails with "rank r has stopped" when its channel closes.
    fn abort(&self, _code: i32) {}
}
