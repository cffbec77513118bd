//! The fuzz targets on stable, in every CI run: each target's checked-in seeds
//! (`fuzz/seeds/<target>/`) and a fixed number of deterministic mutations of it (bit flips,
//! interesting bytes, insertions, deletions, repeats, splices, truncations) go through the same
//! function the cargo-fuzz target calls (`cloudfunc_server::fuzzing`). An input that panics is
//! written to `out/fuzz/` and fails the test, naming the file (`cargo fuzz run TARGET FILE`
//! reproduces it under libFuzzer). `FUZZ_REPLAY_RUNS` sets the mutations per target (default
//! 20,000).

use std::path::{Path, PathBuf};

use cloudfunc_server::fuzzing::TARGETS;

/// A small deterministic generator (xorshift64*), seeded per target.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            usize::try_from(self.next() % n as u64).unwrap_or(0)
        }
    }
}

const INTERESTING: &[u8] = b"\x00\x01\x7f\x80\xff\"{}[]/.~@:=&\\\n ";

fn mutate(rng: &mut Rng, input: &[u8], seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = out.len();
        match rng.below(7) {
            0 if len > 0 => {
                let i = rng.below(len);
                out[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                out[i] = INTERESTING[rng.below(INTERESTING.len())];
            }
            2 => {
                let i = rng.below(len + 1);
                out.insert(i, INTERESTING[rng.below(INTERESTING.len())]);
            }
            3 if len > 1 => {
                let start = rng.below(len);
                let end = (start + 1 + rng.below(16)).min(len);
                out.drain(start..end);
            }
            4 if len > 0 => {
                let start = rng.below(len);
                let end = (start + 1 + rng.below(32)).min(len);
                let chunk = out[start..end].to_vec();
                let at = rng.below(out.len() + 1);
                out.splice(at..at, chunk);
            }
            5 => {
                let other = &seeds[rng.below(seeds.len())];
                let cut = rng.below(len + 1);
                let from = rng.below(other.len() + 1);
                out.truncate(cut);
                out.extend_from_slice(&other[from..]);
            }
            _ if len > 0 => out.truncate(rng.below(len)),
            _ => out.push(INTERESTING[rng.below(INTERESTING.len())]),
        }
    }
    out
}

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/seeds")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let mut seeds: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    seeds.push(Vec::new());
    seeds
}

/// Runs `input` through `f`; a panic is saved and reported.
fn run(target: &str, f: fn(&[u8]), input: &[u8], n: usize) {
    if std::panic::catch_unwind(|| f(input)).is_err() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../out/fuzz");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{target}-{n}.bin"));
        std::fs::write(&path, input).unwrap();
        panic!(
            "{target} panicked on input {n}, saved to {}",
            path.display()
        );
    }
}

#[test]
fn every_target_survives_its_corpus_and_mutations() {
    let runs: usize = std::env::var("FUZZ_REPLAY_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    // Panics are expected to be caught here, not printed for each.
    std::panic::set_hook(Box::new(|_| {}));
    for (target, f) in TARGETS {
        let seeds = corpus(target);
        assert!(seeds.len() > 1, "{target} has no seeds");
        let mut rng = Rng(target.bytes().fold(0x9e37_79b9_7f4a_7c15, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        }));
        for (i, seed) in seeds.iter().enumerate() {
            run(target, *f, seed, i);
        }
        for n in 0..runs {
            let seed = &seeds[rng.below(seeds.len())];
            let input = mutate(&mut rng, seed, &seeds);
            run(target, *f, &input, seeds.len() + n);
        }
        println!(
            "{target}: {} seeds and {runs} mutations, no panic",
            seeds.len()
        );
    }
    let _ = std::panic::take_hook();
}
