//! A validation hook's refusal, read out of the guest capped. The guest
//! returns `list<violation>`; lifting it whole would copy every element
//! into the host (400,000 empty violations are 29 MB of host memory per
//! document, and elements may all point at one large string), and after the
//! call returns the guest frees the list, so it cannot be read lazily
//! either. `Capped` lifts the list itself, during the call: only its first
//! `keep` elements are copied, and only while their size, strings and
//! structure, stays within the output limit; the rest are counted.
//!
//! This uses wasmtime's hidden lifting interface (the one `bindgen!` and the
//! derive macros use), pinned with wasmtime's version.

use std::cell::Cell;

use wasmtime::component::__internal::{CanonicalAbiInfo, InstanceType, InterfaceType, LiftContext};
use wasmtime::component::{ComponentType, Lift, WasmList};

use super::bindings::Violation;

/// What a violation costs against the output limit beyond its strings:
/// its structure (the canonical ABI's 28 bytes, rounded up for the JSON
/// it becomes), so a flood of empty violations is not free.
pub const VIOLATION_OVERHEAD: usize = 32;

thread_local! {
    /// The caps of the call running on this thread: violations kept, and
    /// bytes they may take. Set right before the call (lifting happens
    /// inside it, on the same thread).
    /// This relies on the call being synchronous (`call`, on one blocking
    /// thread): with `call_async` the lift could run on another thread, or
    /// interleave with another call on this one, and read the wrong caps.
    static CAPS: Cell<(usize, usize)> = const { Cell::new((0, 0)) };
}

/// Sets the caps the next lifted refusal on this thread is read with.
pub fn set_caps(keep: usize, output_bytes: usize) {
    CAPS.with(|c| c.set((keep, output_bytes)));
}

/// A hook's refusal as lifted: the violations kept, how many more there
/// were, and the size reached if the kept ones outgrew the output limit.
#[derive(Debug, Default)]
pub struct Capped {
    pub violations: Vec<Violation>,
    pub omitted: usize,
    pub oversize: Option<usize>,
}

impl Capped {
    /// Reads up to the caps' worth of the `len` elements at `ptr` (already
    /// checked to be in bounds and aligned by `WasmList`).
    fn read(
        cx: &mut LiftContext<'_>,
        elem: InterfaceType,
        ptr: usize,
        len: usize,
    ) -> wasmtime::Result<Self> {
        let (keep, limit) = CAPS.with(Cell::get);
        let memory = cx.memory();
        let mut out = Self::default();
        let mut size = 0usize;
        for i in 0..len.min(keep) {
            let at = ptr + i * Violation::SIZE32;
            let bytes = memory
                .get(at..at + Violation::SIZE32)
                .ok_or_else(|| wasmtime::format_err!("violation {i} is out of bounds"))?;
            let v = Violation::linear_lift_from_memory(cx, elem, bytes)?;
            size = size.saturating_add(
                VIOLATION_OVERHEAD
                    + v.path.len()
                    + v.message.len()
                    + v.code.as_ref().map_or(0, String::len),
            );
            if size > limit {
                out.oversize = Some(size);
                break;
            }
            out.violations.push(v);
        }
        out.omitted = len - out.violations.len();
        Ok(out)
    }
}

fn element(cx: &LiftContext<'_>, ty: InterfaceType) -> wasmtime::Result<InterfaceType> {
    match ty {
        InterfaceType::List(i) => Ok(cx.types[i].element),
        _ => Err(wasmtime::format_err!("a refusal must be a list")),
    }
}

// SAFETY: `Capped` is lifted exactly as `list<violation>` (`WasmList`):
// the same flat representation, ABI and type check, delegated to it.
#[allow(unsafe_code)]
unsafe impl ComponentType for Capped {
    type Lower = <WasmList<Violation> as ComponentType>::Lower;

    const ABI: CanonicalAbiInfo = <WasmList<Violation> as ComponentType>::ABI;

    fn typecheck(ty: &InterfaceType, types: &InstanceType<'_>) -> wasmtime::Result<()> {
        <WasmList<Violation> as ComponentType>::typecheck(ty, types)
    }
}

// SAFETY: the pointer and length are validated by `WasmList`'s own lift
// (bounds, alignment, fuel) before any element is read, and each element
// is read with bounds-checked slicing and `Violation`'s own lift.
#[allow(unsafe_code)]
unsafe impl Lift for Capped {
    fn linear_lift_from_flat(
        cx: &mut LiftContext<'_>,
        ty: InterfaceType,
        src: &Self::Lower,
    ) -> wasmtime::Result<Self> {
        let list = WasmList::<Violation>::linear_lift_from_flat(cx, ty, src)?;
        let ptr = usize::try_from(src[0].get_u32())?;
        Self::read(cx, element(cx, ty)?, ptr, list.len())
    }

    fn linear_lift_from_memory(
        cx: &mut LiftContext<'_>,
        ty: InterfaceType,
        bytes: &[u8],
    ) -> wasmtime::Result<Self> {
        let list = WasmList::<Violation>::linear_lift_from_memory(cx, ty, bytes)?;
        let mut word = [0u8; 4];
        word.copy_from_slice(bytes.get(..4).unwrap_or(&[0; 4]));
        let ptr = usize::try_from(u32::from_le_bytes(word))?;
        Self::read(cx, element(cx, ty)?, ptr, list.len())
    }
}
