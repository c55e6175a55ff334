//! A hostile validation hook, for the sandbox tests: what it does is set by
//! `config.mode`. Every mode except `accept`, `sleep`, `write-secret` and
//! the scans must end in a limit error (or a bounded refusal), never harm
//! the host.

use std::hint::black_box;

use bss_plugin::serde_json::Value;
use bss_plugin::{Context, ValidationHook, Violation, forward};

/// The hook.
pub struct Hostile;

impl ValidationHook for Hostile {
    fn validate(
        ctx: &Context,
        _record: &Value,
        _prev: Option<&Value>,
    ) -> Result<(), Vec<Violation>> {
        let text = |key: &str| ctx.config[key].as_str().unwrap_or_default().to_owned();
        match text("mode").as_str() {
            // Spins until the deadline (or the fuel budget) stops it.
            "loop" => {
                let mut n = 0u64;
                loop {
                    n = black_box(n.wrapping_add(1));
                }
            }
            // Allocates until the memory limit stops it.
            "memory" => {
                let mut hoard = Vec::new();
                loop {
                    hoard.push(black_box(vec![1u8; 1 << 20]));
                }
            }
            // Exhausts wasmtime's own call stack.
            "recursion" => {
                black_box(recurse(black_box(u64::MAX)));
                Ok(())
            }
            // Recursion with a large local on the shadow stack (Rust's stack
            // in linear memory, below the data): it runs past address 0
            // long before wasmtime's call stack is exhausted.
            "big-frames" => {
                black_box(recurse_big(black_box(u64::MAX)));
                Ok(())
            }
            // The same without zeroing the local: the first store into the
            // new frame faults (no host call between).
            "big-frames-raw" => {
                black_box(recurse_raw(black_box(u64::MAX)));
                Ok(())
            }
            // Sleeps `ms` milliseconds (default 200), then accepts: a slow
            // hook that succeeds, holding a call slot all the while.
            "sleep" => {
                let ms = ctx.config["ms"].as_u64().unwrap_or(200);
                std::thread::sleep(std::time::Duration::from_millis(ms));
                Ok(())
            }
            // `count` empty violations (default 400,000): tiny strings, a
            // huge structure.
            "violations" => {
                let count = ctx.config["count"].as_u64().unwrap_or(400_000) as usize;
                Err((0..count).map(|_| Violation::new("", "")).collect())
            }
            // A refusal far larger than the output limit.
            "huge" => Err(vec![Violation::new("", "x".repeat(2 << 20))]),
            "trap" => panic!("the hostile plugin traps on purpose"),
            // Floods stderr (16 MiB), then panics: only the first part of
            // what it wrote may reach the host's answer and logs.
            "stderr-flood" => {
                let line = "x".repeat(1024);
                for _ in 0..16 * 1024 {
                    eprintln!("{line}");
                }
                panic!("after the flood")
            }
            // A service call that never answers (on a path the task
            // service serves, so the host lets it through).
            "hang-forward" => match forward("task", "/api/task/schedule", &Value::Null) {
                Ok(_) => Ok(()),
                Err(e) => Err(vec![Violation::new("", e)]),
            },
            // Leaves a secret all over its memory, then accepts.
            "write-secret" => {
                let secret = text("secret");
                let copies: Vec<String> = (0..4096).map(|_| secret.clone()).collect();
                black_box(&copies);
                Ok(())
            }
            // Looks for a secret in its memory; `needle` is the secret
            // reversed, so this plugin never holds it in order itself.
            "scan" => found_or_not(&text("needle")),
            // The scanner's control: puts the secret in memory, then scans.
            "scan-self" => {
                let needle = text("needle");
                let secret: String = needle.chars().rev().collect();
                let copies: Vec<String> = (0..64).map(|_| secret.clone()).collect();
                black_box(&copies);
                found_or_not(&needle)
            }
            _ => Ok(()),
        }
    }
}

fn recurse(n: u64) -> u64 {
    if n == 0 {
        0
    } else {
        black_box(recurse(black_box(n - 1))) + 1
    }
}

fn recurse_big(n: u64) -> u64 {
    let mut frame = [0u8; 4096];
    frame[(n % 4096) as usize] = n as u8;
    let frame = black_box(&mut frame);
    if n == 0 {
        0
    } else {
        u64::from(frame[0]) + black_box(recurse_big(black_box(n - 1)))
    }
}

fn recurse_raw(n: u64) -> u64 {
    let mut frame = [std::mem::MaybeUninit::<u8>::uninit(); 4096];
    frame[(n % 4096) as usize].write(n as u8);
    let frame = black_box(&mut frame);
    if n == 0 {
        0
    } else {
        black_box(frame.len() as u64) + black_box(recurse_raw(black_box(n - 1)))
    }
}

fn found_or_not(reversed: &str) -> Result<(), Vec<Violation>> {
    if !reversed.is_empty() && scan_memory(reversed.as_bytes()) {
        Err(vec![
            Violation::new("", "found the secret").with_code("found"),
        ])
    } else {
        Ok(())
    }
}

/// Whether the secret (given reversed) is anywhere in linear memory,
/// including memory no live allocation covers.
#[cfg(target_arch = "wasm32")]
fn scan_memory(reversed: &[u8]) -> bool {
    // Grow the heap so fresh pages are scanned too.
    let spare: Vec<u8> = Vec::with_capacity(4 << 20);
    black_box(&spare);
    let size = core::arch::wasm32::memory_size(0) * 65536;
    let n = reversed.len();
    let at = |i: usize| -> u8 {
        // SAFETY: every address below memory_size is readable in wasm.
        unsafe { core::ptr::read_volatile(i as *const u8) }
    };
    (8..size.saturating_sub(n)).any(|i| (0..n).all(|k| at(i + k) == reversed[n - 1 - k]))
}

#[cfg(not(target_arch = "wasm32"))]
fn scan_memory(_reversed: &[u8]) -> bool {
    false
}

bss_plugin::export_validation_hook!(Hostile);

#[cfg(test)]
mod tests {
    use super::*;
    use bss_plugin::serde_json::json;

    #[test]
    fn accepts_and_refuses_as_configured() {
        let run = |config| Hostile::validate(&Context::for_test(config), &json!({}), None);
        assert!(run(json!({"mode": "accept"})).is_ok());
        assert!(run(json!({"mode": "write-secret", "secret": "s"})).is_ok());
        let huge = run(json!({"mode": "huge"})).unwrap_err();
        assert!(huge[0].message.len() > 1 << 20);
    }
}
