//! Safetensors checkpoints: exact round trips, and errors that name the problem.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use emprior::diffusion::presets::to_metadata;
use emprior::diffusion::{preset, Network};
use emprior::io::{load_checkpoint, save_checkpoint};
use emprior::nn::{TimeMlp, UNet, UNetConfig};
use emprior::{DType, Device};
use safetensors::tensor::{Dtype, TensorView};

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("emprior-ckpt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn small_unet() -> Network {
    Network::UNet(
        UNet::new(UNetConfig {
            in_channels: 2,
            out_channels: 2,
            channels: vec![4, 6],
            blocks: vec![1, 2],
            attention: vec![(1, 2)],
            emb: 8,
            dropout: 0.1,
            patch: 2,
            resolution: (8, 8),
        })
        .unwrap(),
    )
}

#[test]
fn round_trips_are_exact_and_rebuild_the_network() {
    for (name, net) in [("mlp", preset("manifold").unwrap()), ("unet", small_unet())] {
        for dtype in [DType::F32, DType::F64] {
            let params = net.layout().init(3, dtype, &Device::Cpu).unwrap();
            let path = tmp(&format!("{name}-{dtype:?}.safetensors"));
            let extra = BTreeMap::from([
                ("preset".to_string(), name.to_string()),
                ("lap".to_string(), "7".to_string()),
            ]);
            save_checkpoint(&path, &net, &params, &extra).unwrap();
            let ck = load_checkpoint(&path, dtype).unwrap();
            assert_eq!(ck.metadata["preset"], name);
            assert_eq!(ck.metadata["lap"], "7");
            assert_eq!(
                ck.network.layout(),
                net.layout(),
                "the architecture comes back from the metadata"
            );
            match dtype {
                DType::F32 => assert_eq!(ck.params.to_vec_f32().unwrap(), params.to_vec_f32().unwrap()),
                _ => assert_eq!(ck.params.to_vec_f64().unwrap(), params.to_vec_f64().unwrap()),
            }
        }
    }
}

/// Writes a safetensors file with the given tensors (f32 zeros of the given shapes) and metadata.
fn write_raw(path: &PathBuf, tensors: &[(&str, Vec<usize>)], meta: HashMap<String, String>) {
    let datas: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, s)| vec![0u8; 4 * s.iter().product::<usize>()])
        .collect();
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .zip(&datas)
        .map(|((n, s), d)| (n.to_string(), TensorView::new(Dtype::F32, s.clone(), d).unwrap()))
        .collect();
    std::fs::write(path, safetensors::serialize(views, Some(meta)).unwrap()).unwrap();
}

#[test]
fn bad_checkpoints_get_errors_that_name_the_problem() {
    let net = Network::Mlp(TimeMlp::new(2, &[3], 4));
    let meta: HashMap<String, String> = to_metadata(&net).into_iter().collect();
    let specs: Vec<(&str, Vec<usize>)> = net
        .layout()
        .specs()
        .iter()
        .map(|s| (s.name.as_str(), s.shape.clone()))
        .collect();

    let path = tmp("wrong-shape.safetensors");
    let mut wrong = specs.clone();
    wrong[0].1 = vec![5, 3];
    write_raw(&path, &wrong, meta.clone());
    let err = load_checkpoint(&path, DType::F32).err().unwrap().to_string();
    assert!(
        err.contains("mlp.0.weight") && err.contains("[5, 3]") && err.contains("[6, 3]"),
        "{err}"
    );

    let path = tmp("missing.safetensors");
    write_raw(&path, &specs[1..], meta.clone());
    let err = load_checkpoint(&path, DType::F32).err().unwrap().to_string();
    assert!(err.contains("missing tensor 'mlp.0.weight'"), "{err}");

    let path = tmp("unexpected.safetensors");
    let mut extra = specs.clone();
    extra.push(("ema.mystery", vec![2]));
    write_raw(&path, &extra, meta.clone());
    let err = load_checkpoint(&path, DType::F32).err().unwrap().to_string();
    assert!(err.contains("unexpected") && err.contains("ema.mystery"), "{err}");

    let path = tmp("no-arch.safetensors");
    write_raw(&path, &specs, HashMap::new());
    let err = load_checkpoint(&path, DType::F32).err().unwrap().to_string();
    assert!(err.contains("arch.kind"), "{err}");

    let path = tmp("corrupt.safetensors");
    std::fs::write(&path, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}").unwrap();
    let err = load_checkpoint(&path, DType::F32).err().unwrap().to_string();
    assert!(
        err.contains("corrupt.safetensors") && err.contains("not a valid safetensors"),
        "{err}"
    );

    let err = load_checkpoint(&tmp("absent.safetensors"), DType::F32)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("absent.safetensors"), "{err}");
}

#[test]
fn saving_never_leaves_a_torn_file() {
    let net = Network::Mlp(TimeMlp::new(2, &[3], 4));
    let params = net.layout().init(1, DType::F32, &Device::Cpu).unwrap();
    // Its own directory: the other tests write checkpoints concurrently.
    let dir = std::env::temp_dir().join(format!("emprior-ckpt-atomic-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("atomic.safetensors");
    save_checkpoint(&path, &net, &params, &BTreeMap::new()).unwrap();
    let dir = path.parent().unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left behind");
    // A wrong-sized parameter buffer is refused before anything is written.
    let short = emprior::Tensor::zeros(&[3], DType::F32, &Device::Cpu).unwrap();
    let err = save_checkpoint(&tmp("never.safetensors"), &net, &short, &BTreeMap::new())
        .unwrap_err()
        .to_string();
    assert!(err.contains("flat buffer"), "{err}");
    assert!(!tmp("never.safetensors").exists());
    // An unwritable destination names the path.
    let err = save_checkpoint(
        std::path::Path::new("/nonexistent-dir/x.safetensors"),
        &net,
        &params,
        &BTreeMap::new(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("/nonexistent-dir"), "{err}");
}

/// A diverged run's weights are never saved: the save fails, naming the tensor and the value,
/// and leaves no file behind.
#[test]
fn non_finite_parameters_are_refused_by_name() {
    let net = preset("manifold").unwrap();
    let mut v = net
        .layout()
        .init(3, DType::F32, &Device::Cpu)
        .unwrap()
        .to_vec_f32()
        .unwrap();
    let last = v.len() - 1;
    v[last] = f32::NAN;
    let params = emprior::Tensor::from_f32(&v, &[v.len()], &Device::Cpu).unwrap();
    let path = tmp("nan.safetensors");
    let e = save_checkpoint(&path, &net, &params, &BTreeMap::new())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("nan.safetensors") && e.contains("NaN") && e.contains("mlp."),
        "{e}"
    );
    assert!(!path.exists(), "nothing written");
}

/// Identical saves give identical bytes (safetensors writes its metadata in a HashMap's random
/// order; ours is sorted), with metadata that needs escaping, and the file still loads.
#[test]
fn identical_saves_give_identical_bytes() {
    let net = preset("manifold").unwrap();
    let params = net.layout().init(3, DType::F32, &Device::Cpu).unwrap();
    let extra = BTreeMap::from([
        (
            "config".to_string(),
            "a = \"quoted\"\n\tb = 'x' \\ é ✓ \u{1}".to_string(),
        ),
        ("lap".to_string(), "3".to_string()),
        ("seed".to_string(), "0".to_string()),
        ("preset".to_string(), "quick".to_string()),
    ]);
    let bytes: Vec<Vec<u8>> = (0..4)
        .map(|i| {
            let path = tmp(&format!("same-{i}.safetensors"));
            save_checkpoint(&path, &net, &params, &extra).unwrap();
            std::fs::read(&path).unwrap()
        })
        .collect();
    assert!(bytes.iter().all(|b| b == &bytes[0]), "the saves differ");
    let header_len = u64::from_le_bytes(bytes[0][..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&bytes[0][8..8 + header_len]).unwrap();
    let (c, l, p) = (
        header.find("\"config\"").unwrap(),
        header.find("\"lap\"").unwrap(),
        header.find("\"preset\"").unwrap(),
    );
    assert!(c < l && l < p, "metadata keys in order: {header}");
    let ck = load_checkpoint(&tmp("same-0.safetensors"), DType::F32).unwrap();
    assert_eq!(ck.metadata["config"], extra["config"]);
}
