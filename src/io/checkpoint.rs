//! Checkpoints as safetensors: one named tensor per parameter (so PyTorch and JAX users can open
//! them), the architecture and run facts in the string metadata. Written atomically (a temporary
//! file in the same directory, synced, then renamed), so a crash never leaves a torn checkpoint.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::device::Device;
use crate::diffusion::presets::{from_metadata, to_metadata};
use crate::diffusion::Network;
use crate::error::{Error, Result};
use crate::nn::ParamLayout;
use crate::tensor::{numel, AsView, DType, Tensor};

/// A loaded checkpoint: the network it describes, its flat parameters (host) and metadata.
pub struct Checkpoint {
    /// The architecture, rebuilt from the metadata.
    pub network: Network,
    /// The flat parameters `[P]` in the network's layout, on the CPU, in the dtype asked for.
    pub params: Tensor,
    /// Every metadata entry of the file: the architecture, `format`, `emprior.version` and run
    /// facts such as `preset`, `seed`, `sigma_min`, `sigma_max`.
    pub metadata: BTreeMap<String, String>,
}

/// Writes `bytes` to `path` through a temporary file and a rename.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |what: &str, e: std::io::Error| Error::Other(format!("{what} {}: {e}", path.display()));
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| Error::Other(format!("{} is not a file path", path.display())))?;
    let tmp = dir.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    let result = (|| {
        let mut f = fs::File::create(&tmp).map_err(|e| io("cannot create a temporary file for", e))?;
        f.write_all(bytes).map_err(|e| io("cannot write", e))?;
        f.sync_all().map_err(|e| io("cannot sync", e))?;
        fs::rename(&tmp, path).map_err(|e| io("cannot move the finished file to", e))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Saves the flat parameters of `network` (f32 or f64, any device) with its architecture and
/// `extra` metadata (preset, lap, seed, ...).
pub fn save_checkpoint(
    path: &Path,
    network: &Network,
    params: &Tensor,
    extra: &BTreeMap<String, String>,
) -> Result<()> {
    let layout = network.layout();
    layout.check(params)?;
    let host = params.to_device(&Device::Cpu)?;
    let (bytes, dtype): (Vec<u8>, Dtype) = match host.dtype() {
        DType::F32 => (
            bytemuck::cast_slice(host.as_view()?.cpu::<f32>()?).to_vec(),
            Dtype::F32,
        ),
        DType::F64 => (
            bytemuck::cast_slice(host.as_view()?.cpu::<f64>()?).to_vec(),
            Dtype::F64,
        ),
        DType::BF16 => return Err(Error::Other("bf16 checkpoints are not supported yet".into())),
    };
    // Nothing non-finite is saved: a diverged run fails here, naming the tensor, instead of
    // leaving a checkpoint that every later load refuses.
    let first_bad = match host.dtype() {
        DType::F32 => host.as_view()?.cpu::<f32>()?.iter().position(|v| !v.is_finite()),
        _ => host.as_view()?.cpu::<f64>()?.iter().position(|v| !v.is_finite()),
    };
    if let Some(i) = first_bad {
        let spec = layout
            .specs()
            .iter()
            .find(|s| (s.offset..s.offset + numel(&s.shape)).contains(&i));
        let name = spec.map_or("?", |s| s.name.as_str());
        let value = host.as_view()?.to_vec_f64()?[i];
        return Err(Error::Other(format!(
            "refusing to save {}: parameter {name} holds {value} (flat index {i}); the training diverged or its input was not finite",
            path.display()
        )));
    }
    let width = host.dtype().size_in_bytes();
    let views = layout
        .specs()
        .iter()
        .map(|s| {
            let start = s.offset * width;
            let data = &bytes[start..start + numel(&s.shape) * width];
            TensorView::new(dtype, s.shape.clone(), data).map(|v| (s.name.clone(), v))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Other(format!("preparing {}: {e}", path.display())))?;
    let mut meta: HashMap<String, String> = to_metadata(network).into_iter().collect();
    meta.insert("format".into(), "emprior-checkpoint-1".into());
    meta.insert("emprior.version".into(), env!("CARGO_PKG_VERSION").into());
    meta.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));
    let mut buf = safetensors::serialize(views, Some(meta.clone()))
        .map_err(|e| Error::Other(format!("serializing {}: {e}", path.display())))?;
    sort_metadata(&mut buf, &meta);
    write_atomically(path, &buf)
}

/// safetensors writes its metadata map in a HashMap's random order, so two identical saves gave
/// different bytes. The metadata object comes first in the header: it is rewritten in place with
/// its keys sorted (the same entries, escaped as serde_json does, hence the same length), and the
/// result is parsed back; anything unexpected keeps safetensors' own bytes.
fn sort_metadata(buf: &mut [u8], meta: &HashMap<String, String>) {
    fn json_string(out: &mut String, s: &str) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                c => out.push(c),
            }
        }
        out.push('"');
    }
    const PREFIX: &[u8] = b"{\"__metadata__\":";
    let sorted: BTreeMap<&String, &String> = meta.iter().collect();
    let mut obj = String::from("{");
    for (i, (k, v)) in sorted.into_iter().enumerate() {
        if i > 0 {
            obj.push(',');
        }
        json_string(&mut obj, k);
        obj.push(':');
        json_string(&mut obj, v);
    }
    obj.push('}');
    let (at, len) = (8 + PREFIX.len(), obj.len());
    let fits = buf.get(8..at) == Some(PREFIX)
        && buf.get(at) == Some(&b'{')
        && buf.get(at + len - 1) == Some(&b'}')
        && matches!(buf.get(at + len), Some(b',' | b'}'));
    if !fits {
        return;
    }
    let original = buf[at..at + len].to_vec();
    buf[at..at + len].copy_from_slice(obj.as_bytes());
    let same = SafeTensors::read_metadata(buf).is_ok_and(|(_, m)| m.metadata().as_ref() == Some(meta));
    if !same {
        buf[at..at + len].copy_from_slice(&original);
    }
}

/// Loads a checkpoint, rebuilding its network from the metadata and checking every tensor
/// against the layout: a missing, unexpected or mis-shaped tensor is an error that names it.
pub fn load_checkpoint(path: &Path, dtype: DType) -> Result<Checkpoint> {
    let bytes = fs::read(path)
        .map_err(|e| Error::Other(format!("cannot read checkpoint {}: {e}", path.display())))?;
    checkpoint_from_bytes(&bytes, path, dtype)
}

/// The checkpoint in the bytes of a safetensors file; `path` names it in errors (the fuzz
/// targets call this directly).
pub fn checkpoint_from_bytes(bytes: &[u8], path: &Path, dtype: DType) -> Result<Checkpoint> {
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| Error::Other(format!("{} is not a valid safetensors file: {e}", path.display())))?;
    let (_, header) = SafeTensors::read_metadata(bytes)
        .map_err(|e| Error::Other(format!("{} is not a valid safetensors file: {e}", path.display())))?;
    let metadata: BTreeMap<String, String> = header
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    let network = from_metadata(&metadata).map_err(|e| Error::Other(format!("{}: {e}", path.display())))?;
    let params = read_params(&st, network.layout(), dtype)
        .map_err(|e| Error::Other(format!("{}: {e}", path.display())))?;
    Ok(Checkpoint {
        network,
        params,
        metadata,
    })
}

fn read_params(st: &SafeTensors, layout: &ParamLayout, dtype: DType) -> Result<Tensor> {
    let mut unexpected: Vec<&str> = st
        .names()
        .into_iter()
        .filter(|n| layout.find(n).is_none())
        .collect();
    if !unexpected.is_empty() {
        unexpected.sort();
        return Err(Error::Other(format!(
            "unexpected tensor(s) {} (not in this architecture)",
            unexpected.join(", ")
        )));
    }
    let mut flat = vec![0.0f64; layout.len()];
    for spec in layout.specs() {
        let t = st
            .tensor(&spec.name)
            .map_err(|_| Error::Other(format!("missing tensor '{}'", spec.name)))?;
        if t.shape() != spec.shape.as_slice() {
            return Err(Error::Other(format!(
                "tensor '{}' has shape {:?}, expected {:?}",
                spec.name,
                t.shape(),
                spec.shape
            )));
        }
        let dst = &mut flat[spec.offset..spec.offset + numel(&spec.shape)];
        let data = t.data();
        match t.dtype() {
            Dtype::F32 => {
                for (d, c) in dst.iter_mut().zip(data.chunks_exact(4)) {
                    *d = f32::from_le_bytes(c.try_into().unwrap()) as f64;
                }
            }
            Dtype::F64 => {
                for (d, c) in dst.iter_mut().zip(data.chunks_exact(8)) {
                    *d = f64::from_le_bytes(c.try_into().unwrap());
                }
            }
            other => {
                return Err(Error::Other(format!(
                    "tensor '{}' has dtype {other:?}, expected F32 or F64",
                    spec.name
                )))
            }
        }
        if let Some(i) = dst.iter().position(|v| !v.is_finite()) {
            return Err(Error::Other(format!(
                "tensor '{}' holds a non-finite value at index {i}",
                spec.name
            )));
        }
    }
    Tensor::from_f64_as(&flat, &[layout.len()], dtype, &Device::Cpu)
}
