//! `cloudfunc-nab`: runs cloudfunc's detector over every series of a NAB-layout `data`
//! folder, one point at a time, writes NAB's result layout, and scores it with the port of
//! NAB's scorer under each profile. `--score DETECTOR --results DIR` scores another
//! detector's published results instead (to check the scorer against NAB's own figures).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use cloudfunc_anomaly::nab::score::{details, sweep, FileScores, Profile};
use cloudfunc_anomaly::nab::{read_corpus, read_result, read_windows, window_rows, write_result};
use cloudfunc_anomaly::{Config, Detector};

/// Runs and scores the detector on the Numenta Anomaly Benchmark.
#[derive(Parser, Debug)]
#[command(name = "cloudfunc-nab", about)]
struct Args {
    /// NAB's data folder (`<category>/<file>.csv`).
    #[arg(long)]
    data: PathBuf,
    /// NAB's labelled windows (`labels/combined_windows.json`).
    #[arg(long)]
    labels: PathBuf,
    /// Where to write the results (`<out>/cloudfunc/<category>/cloudfunc_<file>.csv`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Score this detector's results (from --results) instead of running ours.
    #[arg(long, requires = "results")]
    score: Option<String>,
    /// NAB's results folder, with `--score`.
    #[arg(long)]
    results: Option<PathBuf>,
    /// Print each file's part of the standard profile's score, at its threshold.
    #[arg(long)]
    per_file: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let corpus = read_corpus(&args.data).context("reading the data")?;
    let labels = read_windows(&args.labels).context("reading the labels")?;
    let started = Instant::now();
    let mut points = 0usize;
    let mut files = Vec::new();
    for series in &corpus {
        let windows = labels.get(&series.name).cloned().unwrap_or_default();
        let windows = window_rows(series, &windows)?;
        let scores = match (&args.score, &args.results) {
            (Some(detector), Some(results)) => read_result(results, detector, series)?,
            _ => {
                let mut detector = Detector::new(Config::default());
                let scores: Vec<f64> = series
                    .seconds
                    .iter()
                    .zip(&series.values)
                    .map(|(t, v)| detector.update(*t, *v))
                    .collect();
                if let Some(out) = &args.out {
                    write_result(out, "cloudfunc", series, &scores)?;
                }
                scores
            }
        };
        points += scores.len();
        files.push(FileScores {
            name: series.name.clone(),
            scores,
            windows,
        });
    }
    let elapsed = started.elapsed();
    let detector = args.score.as_deref().unwrap_or("cloudfunc");
    println!(
        "{detector} on {} series, {points} points ({:.2} µs per point, reading included)",
        files.len(),
        elapsed.as_secs_f64() * 1e6 / points.max(1) as f64
    );
    println!("| profile | normalized score | threshold | raw | true positive rows | false positive rows |");
    println!("|---|---|---|---|---|---|");
    for (name, profile) in Profile::ALL {
        let s = sweep(&files, profile);
        println!(
            "| {name} | {:.2} | {:.6} | {:.3} | {} | {} |",
            s.normalized, s.threshold, s.raw, s.true_positives, s.false_positives
        );
        if args.per_file && name == "standard" {
            for (f, d) in files.iter().zip(details(&files, profile, s.threshold)) {
                println!(
                    "|   {} | {:.3} | {}/{} windows | first at {:?} of {:?} | {} false positives |",
                    f.name,
                    d.raw,
                    d.detected,
                    d.windows,
                    d.first_detections,
                    f.windows,
                    d.false_positives
                );
            }
        }
    }
    Ok(())
}
