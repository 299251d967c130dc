//! Files the user touches: safetensors checkpoints.

pub mod checkpoint;

pub use checkpoint::{load_checkpoint, save_checkpoint, write_atomically, Checkpoint};
