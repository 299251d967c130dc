//! The training log: each step's loss and gradient norm stay on the device (one buffer, in the
//! parameters' dtype, a plain tensor on the CPU backend) until the host asks for them at its log
//! interval, so a training step needs no host synchronisation. A non-finite loss or gradient norm
//! raises a sticky flag on the device, which also stops every later Adam update (the parameters
//! stay those of the last good step); the host learns of it, with the first bad step, at the next
//! [`StepLog::take`].
//!
//! Layout (kernels/adam.cu reads and writes it the same way): a header of [`HEADER`] values
//! (flag, first bad record, the gate Adam clips with, the current step's loss, the records
//! written since the last read, the current update's learning rate and bias corrections), then
//! two values per record (loss, gradient norm). A step writes its loss into the header and the
//! gradient norm's finish files it, with the norm, as the next record: every place a step writes
//! is the same from step to step, so a captured step replays. Record indices are exact in f32 up
//! to 2^24 steps between two reads.

use crate::device::Device;
use crate::error::{Error, Result};
use crate::real::Real;
use crate::tensor::{AsView, AsViewMut, DType, Tensor, ViewMut};

/// Values before the first record; must equal LOG_HEADER in kernels/adam.cu.
pub const HEADER: usize = 8;
/// Header slots (LOG_* in kernels/adam.cu).
pub(crate) const FLAG: usize = 0;
pub(crate) const FIRST_BAD: usize = 1;
pub(crate) const GATE: usize = 2;
pub(crate) const LOSS: usize = 3;
pub(crate) const RECORDS: usize = 4;
pub(crate) const LR: usize = 5;
pub(crate) const BIAS1: usize = 6;
pub(crate) const BIAS2: usize = 7;
/// Records the buffer holds at first; it doubles when full (a device-to-device copy).
const INITIAL_RECORDS: usize = 1024;

/// One step as the log recorded it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TrainStep {
    /// The step's index in its run (0 for the first update).
    pub step: u64,
    /// The step's denoising score-matching loss on its batch.
    pub loss: f64,
    /// The global L2 norm of the step's gradient, before clipping.
    pub grad_norm: f64,
    /// The learning rate the step used.
    pub lr: f64,
}

/// Per-step records on the device since the last [`StepLog::take`].
pub struct StepLog {
    buf: Tensor,
    capacity: usize,
    /// Host-side facts of each open record: its step index and learning rate.
    open: Vec<(u64, f64)>,
    /// The error already reported, repeated by every later take (the flag is sticky).
    failed: Option<String>,
}

/// The offset of record `slot`'s loss in the buffer (its gradient norm follows).
pub(crate) fn record_offset(slot: usize) -> usize {
    HEADER + 2 * slot
}

impl StepLog {
    /// An empty log for parameters of `dtype` on `device`.
    pub fn new(dtype: DType, device: &Device) -> Result<Self> {
        Ok(StepLog {
            buf: Tensor::zeros(&[record_offset(INITIAL_RECORDS)], dtype, device)?,
            capacity: INITIAL_RECORDS,
            open: Vec::new(),
            failed: None,
        })
    }

    /// Records written since the last take.
    pub fn len(&self) -> usize {
        self.open.len()
    }

    /// Whether no record was written since the last take.
    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }

    /// Opens the record of step `step` (learning rate `lr`) and returns its slot. Its loss must
    /// be written (through [`StepLog::with_loss`]) before the step's gradient norm is finished,
    /// or it reads as an older step's loss (or the zero) left there. The buffer grows here when
    /// full (a new buffer: see [`StepLog::capacity`]).
    pub fn begin(&mut self, step: u64, lr: f64) -> Result<usize> {
        self.reserve_one()?;
        self.open.push((step, lr));
        Ok(self.open.len() - 1)
    }

    /// Runs `f` with the current step's loss (in the header, filed as the open record by the
    /// gradient norm's finish) as a scalar view for an op to write.
    pub fn with_loss<R>(&mut self, f: impl FnOnce(&mut ViewMut) -> Result<R>) -> Result<R> {
        if self.open.is_empty() {
            return Err(Error::Other("training log: no record is open for a loss".into()));
        }
        let mut whole = self.buf.as_view_mut()?;
        let mut loss = whole.sub_mut(LOSS, &[])?;
        f(&mut loss)
    }

    /// The whole buffer (a captured step writes it: see [`StepLog::capacity`]).
    pub(crate) fn buffer(&self) -> &Tensor {
        &self.buf
    }

    /// The whole buffer, for the kernels of the step that fill a record.
    pub(crate) fn buffer_mut(&mut self) -> &mut Tensor {
        &mut self.buf
    }

    /// Records the buffer holds before it grows (a grown log is a new buffer, so a captured step
    /// that writes the old one must be captured again).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub(crate) fn check_slot(&self, slot: usize) -> Result<()> {
        if slot >= self.open.len() {
            return Err(Error::Other(format!(
                "training log: record {slot} is not open ({} open)",
                self.open.len()
            )));
        }
        Ok(())
    }

    /// Room for one more record now, growing the buffer if it is full (a new buffer, and a new
    /// [`StepLog::capacity`]: a captured step that writes the old one must be captured again).
    pub(crate) fn reserve_one(&mut self) -> Result<()> {
        if self.open.len() == self.capacity {
            self.grow()?;
        }
        Ok(())
    }

    /// Forgets the newest open record on the host: for a step whose kernels never ran (an
    /// abandoned capture), so the device never filed it.
    pub(crate) fn forget_last(&mut self) {
        self.open.pop();
    }

    /// Doubles the capacity, keeping the header and the records written so far.
    fn grow(&mut self) -> Result<()> {
        let (dtype, device) = (self.buf.dtype(), self.buf.device());
        let capacity = 2 * self.capacity;
        let mut bigger = Tensor::zeros(&[record_offset(capacity)], dtype, &device)?;
        let used = record_offset(self.open.len());
        {
            let src = self.buf.as_view()?.sub(0, &[used])?;
            let mut whole = bigger.as_view_mut()?;
            crate::ops::copy_into(&src, &mut whole.sub_mut(0, &[used])?)?;
        }
        self.buf = bigger;
        self.capacity = capacity;
        Ok(())
    }

    /// The device's count of records back to zero: the next step files the first record.
    fn reset_records(&mut self) -> Result<()> {
        let mut whole = self.buf.as_view_mut()?;
        let mut count = whole.sub_mut(RECORDS, &[1])?;
        crate::ops::fill(&mut count, 0.0)
    }

    /// The records since the last take, read in one host synchronisation (none when no step ran),
    /// and a fresh window. Fails, naming the first bad step, when a step's loss or gradient norm
    /// was not finite; every later take fails the same way.
    pub fn take(&mut self) -> Result<Vec<TrainStep>> {
        if let Some(e) = &self.failed {
            return Err(Error::Other(e.clone()));
        }
        if self.open.is_empty() {
            return Ok(Vec::new());
        }
        let used = record_offset(self.open.len());
        let values = self.buf.as_view()?.sub(0, &[used])?.to_vec_f64()?;
        self.reset_records()?;
        let open = std::mem::take(&mut self.open);
        let steps: Vec<TrainStep> = open
            .iter()
            .enumerate()
            .map(|(slot, &(step, lr))| TrainStep {
                step,
                loss: values[record_offset(slot)],
                grad_norm: values[record_offset(slot) + 1],
                lr,
            })
            .collect();
        if values[RECORDS] as usize != open.len() && values[FLAG] == 0.0 {
            return Err(Error::Other(format!(
                "training log: the device filed {} records for {} steps",
                values[RECORDS],
                open.len()
            )));
        }
        if values[FLAG] != 0.0 {
            let bad = steps
                .get(values[FIRST_BAD] as usize)
                .copied()
                .ok_or_else(|| Error::Other("training log: the flagged record is out of range".into()))?;
            let e = if !bad.loss.is_finite() {
                format!(
                    "training step {}: the loss is {} (diverged, or NaN in the data)",
                    bad.step, bad.loss
                )
            } else {
                format!(
                    "training step {}: the gradient norm is {} (a NaN or an overflow upstream)",
                    bad.step, bad.grad_norm
                )
            };
            self.failed = Some(e.clone());
            return Err(Error::Other(e));
        }
        Ok(steps)
    }
}

/// The CPU twin of kernels/adam.cu's `adam_norm_finish_f32`: files the loss waiting in the
/// header and the gradient norm (the square root of `sum_sq`, rounded to the log's type) as the
/// next record of `capacity`, raises the flag when either is not finite (or the log is full),
/// sets the gate, and stores the update's learning rate and bias corrections (`lr`, 1 - beta^t).
pub(crate) fn finish_norm<T: Real>(
    log: &mut [T],
    sum_sq: f64,
    capacity: usize,
    lr: f64,
    bias1: f64,
    bias2: f64,
) {
    let norm = T::from_f64(sum_sq.sqrt());
    let loss = log[LOSS];
    let slot = log[RECORDS].to_f64() as usize;
    let stored = slot < capacity;
    if stored {
        let r = record_offset(slot);
        log[r] = loss;
        log[r + 1] = norm;
        log[RECORDS] = T::from_f64((slot + 1) as f64);
    }
    let finite = |v: T| v.to_f64().is_finite();
    if log[FLAG] == T::ZERO && !(stored && finite(loss) && finite(norm)) {
        log[FLAG] = T::ONE;
        log[FIRST_BAD] = T::from_f64(slot as f64);
    }
    log[GATE] = if log[FLAG] != T::ZERO {
        T::from_f64(f64::NAN)
    } else {
        norm
    };
    log[LR] = T::from_f64(lr);
    log[BIAS1] = T::from_f64(bias1);
    log[BIAS2] = T::from_f64(bias2);
}
