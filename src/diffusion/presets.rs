//! The paper's networks by name, and the key/value form of a network's architecture that
//! checkpoints carry in their metadata (so a checkpoint alone rebuilds its network).

use std::collections::BTreeMap;

use super::precond::Network;
use crate::error::{Error, Result};
use crate::nn::{TimeMlp, UNet, UNetConfig};

/// The preset names `emprior model --preset` takes.
pub const PRESETS: &[&str] = &["manifold", "cifar10", "mri"];

/// The network of a paper experiment: `manifold` (TimeMLP 5 -> (256, 256, 256), E = 64),
/// `cifar10` or `mri` (U-Nets, method.md §3.4).
pub fn preset(name: &str) -> Result<Network> {
    match name {
        "manifold" => Ok(Network::Mlp(TimeMlp::new(5, &[256, 256, 256], 64))),
        "cifar10" => Ok(Network::UNet(UNet::new(UNetConfig::cifar10())?)),
        "mri" => Ok(Network::UNet(UNet::new(UNetConfig::mri())?)),
        other => Err(Error::Other(format!(
            "unknown preset '{other}' (expected one of {})",
            PRESETS.join(", ")
        ))),
    }
}

fn list(v: &[usize]) -> String {
    v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",")
}

fn parse_list(key: &str, s: &str) -> Result<Vec<usize>> {
    if s.is_empty() {
        return Ok(Vec::new());
    }
    s.split(',')
        .map(|p| {
            p.trim()
                .parse()
                .map_err(|_| Error::Other(format!("metadata '{key}': '{s}' is not a list of integers")))
        })
        .collect()
}

/// The architecture as string key/values (`arch.*`).
pub fn to_metadata(net: &Network) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    let mut put = |k: &str, v: String| {
        m.insert(format!("arch.{k}"), v);
    };
    match net {
        Network::Mlp(mlp) => {
            put("kind", "time_mlp".into());
            put("features", mlp.features.to_string());
            put("hidden", list(&mlp.hidden));
            put("emb", mlp.emb.to_string());
        }
        Network::UNet(u) => {
            let c = &u.config;
            put("kind", "unet".into());
            put("in_channels", c.in_channels.to_string());
            put("out_channels", c.out_channels.to_string());
            put("channels", list(&c.channels));
            put("blocks", list(&c.blocks));
            put(
                "attention",
                c.attention
                    .iter()
                    .map(|(l, h)| format!("{l}:{h}"))
                    .collect::<Vec<_>>()
                    .join(","),
            );
            put("emb", c.emb.to_string());
            put("dropout", c.dropout.to_string());
            put("patch", c.patch.to_string());
            put("resolution", format!("{}x{}", c.resolution.0, c.resolution.1));
        }
    }
    m
}

/// Rebuilds a network from `arch.*` metadata, naming any missing or malformed key.
pub fn from_metadata(m: &BTreeMap<String, String>) -> Result<Network> {
    let get = |k: &str| -> Result<&str> {
        m.get(&format!("arch.{k}"))
            .map(String::as_str)
            .ok_or_else(|| Error::Other(format!("checkpoint metadata lacks 'arch.{k}'")))
    };
    let num = |k: &str| -> Result<usize> {
        get(k)?
            .parse()
            .map_err(|_| Error::Other(format!("checkpoint metadata 'arch.{k}' is not an integer")))
    };
    match get("kind")? {
        "time_mlp" => Ok(Network::Mlp(TimeMlp::new(
            num("features")?,
            &parse_list("hidden", get("hidden")?)?,
            num("emb")?,
        ))),
        "unet" => {
            let attention = get("attention")?
                .split(',')
                .filter(|s| !s.is_empty())
                .map(|pair| {
                    let (l, h) = pair
                        .split_once(':')
                        .ok_or_else(|| Error::Other(format!("bad attention entry '{pair}'")))?;
                    let parse = |v: &str| {
                        v.parse::<usize>()
                            .map_err(|_| Error::Other(format!("bad attention entry '{pair}'")))
                    };
                    Ok((parse(l)?, parse(h)?))
                })
                .collect::<Result<Vec<_>>>()?;
            let res = get("resolution")?;
            let (h, w) = res
                .split_once('x')
                .and_then(|(h, w)| Some((h.parse().ok()?, w.parse().ok()?)))
                .ok_or_else(|| {
                    Error::Other(format!(
                        "checkpoint metadata 'arch.resolution' = '{res}' is not HxW"
                    ))
                })?;
            let config = UNetConfig {
                in_channels: num("in_channels")?,
                out_channels: num("out_channels")?,
                channels: parse_list("channels", get("channels")?)?,
                blocks: parse_list("blocks", get("blocks")?)?,
                attention,
                emb: num("emb")?,
                dropout: get("dropout")?
                    .parse()
                    .map_err(|_| Error::Other("checkpoint metadata 'arch.dropout' is not a number".into()))?,
                patch: num("patch")?,
                resolution: (h, w),
            };
            Ok(Network::UNet(UNet::new(config)?))
        }
        other => Err(Error::Other(format!(
            "checkpoint metadata 'arch.kind' = '{other}' is not a known network"
        ))),
    }
}
