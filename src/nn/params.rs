//! Flat parameters: every parameter of a network lives in one contiguous buffer (and so do its
//! gradients, Adam moments and EMA copy, in the same layout), with named views into it. One
//! kernel can then update them all, and a checkpoint is one buffer plus the names.

use crate::device::Device;
use crate::error::{Error, Result};
use crate::ops::precision::{to_bf16, Bf16Ref, Precision};
use crate::ops::Philox;
use crate::real::Real;
use crate::tensor::{numel, AsView, AsViewMut, DType, Tensor, View, ViewMut};

/// The parameters one network call reads: the flat f32 master buffer (what `Deref` gives, so
/// `layout.view(params, id)` reads it) and, under the bf16 policy, a bf16 copy of the whole
/// buffer in the same layout. The copy is made where the master changes, not by the layers:
/// the optimizer's step writes it beside the parameters ([`crate::train::Adam`]), the sampler
/// casts its fixed weights once ([`crate::posterior::NetworkPrior::new`]), so a layer reads its
/// bf16 weight from it instead of casting the weight at every call. Without a copy the layers
/// cast (the same bits: both round to nearest even).
#[derive(Clone)]
pub struct Weights<'a> {
    master: View<'a>,
    bf16: Option<&'a Tensor>,
}

impl<'a> Weights<'a> {
    /// The master buffer with its bf16 copy, which must be bf16, as long and on the same device.
    /// The caller keeps the two equal (the copy rounded from the master); layers trust it.
    pub fn new(master: View<'a>, bf16: Option<&'a Tensor>) -> Result<Self> {
        if let Some(copy) = bf16 {
            if copy.dtype() != DType::BF16 || copy.shape() != [master.numel()] {
                return Err(Error::shape(
                    "weights",
                    format!("bf16 copy ({:?})", copy.dtype()),
                    [master.numel()],
                    copy.shape(),
                ));
            }
            if !copy.device().same_as(&master.device()) {
                return Err(Error::Other(format!(
                    "weights: the bf16 copy is on {} and the parameters on {}",
                    copy.device(),
                    master.device()
                )));
            }
        }
        Ok(Weights { master, bf16 })
    }

    /// The f32 (or f64) master buffer.
    pub fn master(&self) -> &View<'a> {
        &self.master
    }

    /// The bf16 copy, when the caller keeps one.
    pub fn bf16_copy(&self) -> Option<&'a Tensor> {
        self.bf16
    }
}

impl<'a> std::ops::Deref for Weights<'a> {
    type Target = View<'a>;
    fn deref(&self) -> &View<'a> {
        &self.master
    }
}

impl<'a> From<View<'a>> for Weights<'a> {
    /// The master buffer alone (the layers cast their bf16 weights per call).
    fn from(master: View<'a>) -> Self {
        Weights { master, bf16: None }
    }
}

impl<'a> From<&View<'a>> for Weights<'a> {
    fn from(master: &View<'a>) -> Self {
        master.clone().into()
    }
}

/// A layer's weight as its tensor-core GEMM reads it: a part of the caller's bf16 copy, or,
/// without one, a cast made for this call.
pub enum Bf16Weight<'a> {
    /// Borrowed from [`Weights::bf16_copy`].
    Copy(Bf16Ref<'a>),
    /// Cast from the master weights for this call.
    Cast(Tensor),
}

impl Bf16Weight<'_> {
    /// The bf16 values.
    pub fn get(&self) -> Bf16Ref<'_> {
        match self {
            Bf16Weight::Copy(r) => r.clone(),
            Bf16Weight::Cast(t) => Bf16Ref::new(t),
        }
    }
}

/// Handle of one parameter in a layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ParamId(pub usize);

/// How a parameter starts (the paper's inox initialisation).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// U(-bound, bound) times `scale`: weights, with bound = 1/sqrt(fan_in) (scale 0.1 for the
    /// last layer of every modulation MLP).
    Uniform {
        /// Half-width of the interval: 1/sqrt(fan_in) for the paper's weights.
        bound: f64,
        /// Factor on every draw: 1, or 0.1 for the modulation output layers.
        scale: f64,
    },
    /// Biases.
    Zeros,
}

/// One parameter's entry in a [`ParamLayout`]: its name, shape and place in the flat buffer.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamSpec {
    /// Checkpoint name, e.g. `down.0.conv.weight`; unique within a layout.
    pub name: String,
    /// Shape, row-major.
    pub shape: Vec<usize>,
    /// Index of its first scalar in the flat buffer.
    pub offset: usize,
    /// How [`ParamLayout::init`] fills it.
    pub init: Init,
}

/// Names, shapes and offsets of every parameter of a network, in registration order. Two
/// layouts are equal when their parameters are (the precision is how they are used, not what
/// they are: a checkpoint fits a network whatever its arithmetic).
#[derive(Clone, Debug, Default)]
pub struct ParamLayout {
    specs: Vec<ParamSpec>,
    total: usize,
    /// The arithmetic the layers use with these parameters (f32 by default; see
    /// [`crate::ops::Precision`]). It lives here because every layer call receives the layout.
    precision: crate::ops::Precision,
}

impl PartialEq for ParamLayout {
    fn eq(&self, other: &Self) -> bool {
        self.specs == other.specs && self.total == other.total
    }
}

impl ParamLayout {
    /// An empty layout.
    pub fn new() -> Self {
        Self::default()
    }

    /// The arithmetic of the layers' GEMMs and convolutions with these parameters.
    pub fn precision(&self) -> crate::ops::Precision {
        self.precision
    }

    /// Sets the layers' arithmetic: bf16 operands with f32 accumulation, or f32 throughout.
    /// Layers whose sizes the tensor-core kernels cannot take (a channel count that is not a
    /// multiple of 8) stay f32 either way.
    pub fn set_precision(&mut self, precision: crate::ops::Precision) {
        self.precision = precision;
    }

    /// Registers a parameter; offsets are handed out in order.
    pub fn add(&mut self, name: impl Into<String>, shape: &[usize], init: Init) -> ParamId {
        let name = name.into();
        debug_assert!(
            self.specs.iter().all(|s| s.name != name),
            "duplicate parameter {name}"
        );
        self.specs.push(ParamSpec {
            name,
            shape: shape.to_vec(),
            offset: self.total,
            init,
        });
        self.total += numel(shape);
        ParamId(self.specs.len() - 1)
    }

    /// A weight with U(+-1/sqrt(fan_in)) initialisation.
    pub fn weight(&mut self, name: impl Into<String>, shape: &[usize], fan_in: usize) -> ParamId {
        self.add(
            name,
            shape,
            Init::Uniform {
                bound: 1.0 / (fan_in as f64).sqrt(),
                scale: 1.0,
            },
        )
    }

    /// The total number of scalars.
    pub fn len(&self) -> usize {
        self.total
    }

    /// Whether the layout holds no scalars.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// Every parameter's spec, in registration (and offset) order.
    pub fn specs(&self) -> &[ParamSpec] {
        &self.specs
    }

    /// The spec of `id`; panics for an id from another, larger layout.
    pub fn spec(&self, id: ParamId) -> &ParamSpec {
        &self.specs[id.0]
    }

    /// The spec named `name`, if there is one.
    pub fn find(&self, name: &str) -> Option<&ParamSpec> {
        self.specs.iter().find(|s| s.name == name)
    }

    /// The parameter `id` as a view into a flat buffer of this layout.
    pub fn view<'a>(&self, flat: &View<'a>, id: ParamId) -> Result<View<'a>> {
        let s = &self.specs[id.0];
        flat.sub(s.offset, &s.shape)
    }

    /// The parameter `id` in bf16 under `shape` (as many elements as the parameter): read from
    /// the bf16 copy in `params` when there is one, else cast now.
    pub fn weight_bf16<'a>(
        &self,
        params: &Weights<'a>,
        id: ParamId,
        shape: &[usize],
    ) -> Result<Bf16Weight<'a>> {
        let s = &self.specs[id.0];
        if numel(shape) != numel(&s.shape) {
            return Err(Error::shape("parameters", &s.name, &s.shape, shape));
        }
        // A weight that does not start at a multiple of 8 in the flat buffer cannot be loaded
        // by the tensor cores from the copy (16-byte chunks): it is cast to a buffer of its own.
        Ok(match params.bf16_copy() {
            Some(copy) if s.offset % 8 == 0 => Bf16Weight::Copy(Bf16Ref::new(copy).sub(s.offset, shape)?),
            _ => Bf16Weight::Cast(to_bf16(&self.view(params, id)?.reshape(shape)?)?),
        })
    }

    /// The bf16 copy of `params` that [`Weights`] carries, when this layout's precision is bf16
    /// (None under f32, where no layer reads one).
    pub fn bf16_copy(&self, params: &impl AsView) -> Result<Option<Tensor>> {
        self.check(params)?;
        match self.precision {
            Precision::Bf16 => Ok(Some(to_bf16(params)?)),
            Precision::F32 => Ok(None),
        }
    }

    /// The parameter `id` as a mutable view into a flat buffer (gradients).
    pub fn view_mut<'b>(&self, flat: &'b mut ViewMut<'_>, id: ParamId) -> Result<ViewMut<'b>> {
        let s = &self.specs[id.0];
        flat.sub_mut(s.offset, &s.shape)
    }

    /// A fresh flat buffer with every parameter initialised from `seed` (parameter i draws from
    /// Philox stream i, so the values do not depend on the device or the dtype).
    pub fn init(&self, seed: u64, dtype: DType, device: &Device) -> Result<Tensor> {
        let mut flat = Tensor::zeros(&[self.total], dtype, &Device::Cpu)?;
        {
            let mut v = flat.as_view_mut()?;
            match dtype {
                DType::F32 => self.init_into::<f32>(seed, v.cpu_mut()?),
                DType::F64 => self.init_into::<f64>(seed, v.cpu_mut()?),
                DType::BF16 => return Err(Error::Other("bf16 parameters are not supported yet".into())),
            }
        }
        flat.to_device(device)
    }

    fn init_into<T: Real>(&self, seed: u64, out: &mut [T]) {
        for (i, s) in self.specs.iter().enumerate() {
            let dst = &mut out[s.offset..s.offset + numel(&s.shape)];
            match s.init {
                Init::Zeros => dst.fill(T::ZERO),
                Init::Uniform { bound, scale } => {
                    let mut u = vec![0.0f32; dst.len()];
                    Philox::new(seed, i as u64).fill_uniform(0, &mut u);
                    for (d, &x) in dst.iter_mut().zip(&u) {
                        *d = T::from_f64(scale * bound * (2.0 * x as f64 - 1.0));
                    }
                }
            }
        }
    }

    /// Checks that a flat buffer fits this layout.
    pub fn check(&self, flat: &impl AsView) -> Result<()> {
        let v = flat.as_view()?;
        if v.shape() != [self.total] {
            return Err(Error::shape("parameters", "flat buffer", [self.total], v.shape()));
        }
        Ok(())
    }
}
