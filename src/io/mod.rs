//! Files the user touches: safetensors checkpoints and NumPy arrays.

pub mod checkpoint;
pub mod npy;
pub mod plot;
/// The run's self-contained HTML report (figures embedded as data URIs).
pub mod report;

pub use checkpoint::{checkpoint_from_bytes, load_checkpoint, save_checkpoint, write_atomically, Checkpoint};
pub use npy::{parse_npy, read_npy, write_npy_f32, write_npy_f64, write_npy_u8, NpyArray};
