//! `cloudfunc chain ...`: deploy a chain from a file (`chain.toml` or `chain.json`, in a
//! directory or named), run it sync or async, and read its runs.

use std::path::Path;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use serde_json::{json, Value};

use super::client::{encode, Client};
use super::commands::Out;

/// What `chain` does.
#[derive(Subcommand, Debug)]
pub enum ChainCommand {
    /// Deploy a chain from a file (chain.toml, chain.json) or a directory holding one.
    Deploy {
        /// The file, or a directory with chain.toml or chain.json (default: here).
        #[arg(default_value = ".")]
        path: String,
        /// The chain's name, over the file's.
        #[arg(long)]
        name: Option<String>,
    },
    /// Run a chain now and print its output (and each step with --steps).
    Invoke {
        /// The chain's name.
        name: String,
        /// The run's input, as JSON; @FILE reads it from a file, - from standard input.
        #[arg(long, default_value = "{}")]
        data: String,
        /// Also list every step.
        #[arg(long)]
        steps: bool,
    },
    /// Queue a durable run and print its id.
    Run {
        /// The chain's name.
        name: String,
        /// The run's input, as JSON; @FILE reads it from a file, - from standard input.
        #[arg(long, default_value = "{}")]
        data: String,
    },
    /// A run: its status, output or error, and every step.
    Status {
        /// The run's id (run_...).
        run: String,
    },
    /// The chains.
    List,
    /// A chain's newest runs.
    Runs {
        /// The chain's name.
        name: String,
    },
    /// Delete a chain.
    Delete {
        /// The chain's name.
        name: String,
    },
}

/// A chain's definition from `path`: a `.toml` or `.json` file, or a directory with
/// `chain.toml` or `chain.json`.
pub fn read_definition(path: &Path) -> Result<Value> {
    let file = if path.is_dir() {
        ["chain.toml", "chain.json"]
            .iter()
            .map(|f| path.join(f))
            .find(|p| p.is_file())
            .with_context(|| format!("{} has no chain.toml or chain.json", path.display()))?
    } else {
        path.to_path_buf()
    };
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    if file.extension().is_some_and(|e| e == "toml") {
        toml::from_str(&text).with_context(|| format!("{} is not valid TOML", file.display()))
    } else {
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", file.display()))
    }
}

/// A run as lines: its status and output or error, then (with `steps`) each step.
fn run_text(run: &Value, steps: bool) -> String {
    let mut lines = vec![format!(
        "{}  {}  {}{}",
        run["run_id"].as_str().unwrap_or(""),
        run["chain"].as_str().unwrap_or(""),
        run["status"].as_str().unwrap_or(""),
        run["duration_ms"]
            .as_i64()
            .map(|d| format!("  {d} ms"))
            .unwrap_or_default()
    )];
    if let Some(output) = run.get("output") {
        lines.push(format!("output: {output}"));
    }
    if let Some(e) = run.get("error") {
        lines.push(format!(
            "error: {} at {}: {}",
            e["kind"].as_str().unwrap_or(""),
            e["step"].as_str().unwrap_or(""),
            e["message"].as_str().unwrap_or("")
        ));
    }
    if steps {
        for s in run["steps"].as_array().into_iter().flatten() {
            let ms = s["usage"]["duration_ms"]
                .as_f64()
                .map(|d| format!("{d:.2} ms"))
                .unwrap_or_default();
            lines.push(format!(
                "  {:<28} {:<14} {:<10} {:>10}  {}",
                s["path"].as_str().unwrap_or(""),
                s["function"].as_str().unwrap_or(""),
                s["status"].as_str().unwrap_or(""),
                ms,
                s["task_id"].as_str().unwrap_or("")
            ));
        }
    }
    lines.join("\n")
}

/// Runs a `chain` command.
pub fn run(c: &Client, out: &Out, command: &ChainCommand) -> Result<bool> {
    match command {
        ChainCommand::Deploy { path, name } => {
            let mut def = read_definition(Path::new(path))?;
            if let Some(n) = name {
                def["name"] = json!(n);
            }
            if def.get("name").is_none() {
                bail!("the chain has no name: put name = \"...\" in the file or pass --name");
            }
            let reply = c.post_json("/api/chains", &def)?.ok()?;
            out.print(reply, |v: &Value| {
                format!(
                    "deployed chain {} ({})",
                    v["name"].as_str().unwrap_or(""),
                    v["id"].as_str().unwrap_or("")
                )
            })?;
            Ok(true)
        }
        ChainCommand::Invoke {
            name,
            data: d,
            steps,
        } => {
            let reply = c
                .post_json(
                    &format!("/api/chains/{}/invoke", encode(name)),
                    &super::data_arg(d)?,
                )?
                .ok()?;
            let ok = reply["status"] == "succeeded";
            out.print(reply, |v: &Value| run_text(v, *steps))?;
            Ok(ok)
        }
        ChainCommand::Run { name, data: d } => {
            let reply = c
                .post_json(
                    &format!("/api/chains/{}/run", encode(name)),
                    &super::data_arg(d)?,
                )?
                .ok()?;
            out.print(reply, |v: &Value| {
                v["run_id"].as_str().unwrap_or("").to_string()
            })?;
            Ok(true)
        }
        ChainCommand::Status { run } => {
            let reply = c.get(&format!("/api/chains/runs/{}", encode(run)))?.ok()?;
            let ok = reply["status"] != "failed" && reply["status"] != "timeout";
            out.print(reply, |v: &Value| run_text(v, true))?;
            Ok(ok)
        }
        ChainCommand::List => {
            let reply = c.get("/api/chains")?.ok()?;
            out.print(reply, |v: &Value| {
                let chains = v["chains"].as_array().cloned().unwrap_or_default();
                if chains.is_empty() {
                    return "no chains".to_string();
                }
                chains
                    .iter()
                    .map(|ch| {
                        let steps = ch["definition"]["steps"].as_array().map_or(0, Vec::len);
                        format!(
                            "{:<24} {}  {steps} steps",
                            ch["name"].as_str().unwrap_or(""),
                            ch["id"].as_str().unwrap_or("")
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            })?;
            Ok(true)
        }
        ChainCommand::Runs { name } => {
            let reply = c.get(&format!("/api/chains/{}/runs", encode(name)))?.ok()?;
            out.print(reply, |v: &Value| {
                let runs = v["runs"].as_array().cloned().unwrap_or_default();
                if runs.is_empty() {
                    return "no runs yet".to_string();
                }
                runs.iter()
                    .map(|r| run_text(r, false))
                    .collect::<Vec<_>>()
                    .join("\n")
            })?;
            Ok(true)
        }
        ChainCommand::Delete { name } => {
            let reply = c.delete(&format!("/api/chains/{}", encode(name)))?.ok()?;
            out.print(reply, |_: &Value| format!("deleted chain {name}"))?;
            Ok(true)
        }
    }
}
