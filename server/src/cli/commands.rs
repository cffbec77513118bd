//! The client commands, one function each: what each sends, and how its answer is printed.

use anyhow::{bail, Result};
use serde_json::Value;

use super::client::{encode, Client};
use super::render::{self, read};
use super::{Cli, Command};
use crate::model::{Task, TaskStatus};

/// Runs a client command against the server.
pub fn run(cli: &Cli) -> Result<bool> {
    if let Command::Keys(super::secrets::KeysCommand::Generate) = &cli.command {
        // A new key for the operator to hand out: no server involved.
        super::say(crate::atrest::MasterKey::generate().encode())?;
        return Ok(true);
    }
    // The keys are the operator's: a token minted here for them is an admin's.
    let admin = matches!(cli.command, Command::Keys(_));
    let c = Client::with(
        &cli.url,
        cli.token.clone(),
        &cli.data_dir,
        (&cli.tenant, admin),
        cli.ca_cert.as_deref(),
    )?;
    let out = Out { json: cli.json };
    match &cli.command {
        Command::Deploy(args) => super::deploy::deploy(&c, &out, args),
        Command::Invoke {
            name,
            data,
            r#async,
            idempotency_key,
        } => invoke(&c, &out, name, data, *r#async, idempotency_key.as_deref()),
        Command::List => list(&c, &out),
        Command::Status { task } => status(&c, &out, task),
        Command::Logs { target } => logs(&c, &out, target),
        Command::Metrics { name, range } => metrics(&c, &out, name, range),
        Command::Versions { name } => versions(&c, &out, name),
        Command::Activate { name } => set_active(&c, &out, name, true),
        Command::Deactivate { name } => set_active(&c, &out, name, false),
        Command::Delete { name } => delete(&c, &out, name),
        Command::Rollback { name, version } => rollback(&c, &out, name, *version),
        Command::Alerts(a) => super::alerts::run(&c, &out, a),
        Command::Chain(a) => super::chains::run(&c, &out, a),
        Command::Secrets(a) => super::secrets::secrets(&c, &out, a),
        Command::Keys(a) => super::secrets::keys(&c, &out, a),
        Command::Serve(_) | Command::Token { .. } | Command::Run(_) => {
            bail!("not a client command")
        }
    }
}

/// Where answers go: the server's JSON as it is (`--json`), or text.
pub struct Out {
    json: bool,
}

impl Out {
    /// Prints `body`: as JSON, or read as `T` and rendered by `text`.
    pub fn print<T: serde::de::DeserializeOwned>(
        &self,
        body: Value,
        text: impl FnOnce(&T) -> String,
    ) -> Result<()> {
        if self.json {
            super::say(serde_json::to_string_pretty(&body)?)?;
        } else {
            super::say(text(&read::<T>(body)?))?;
        }
        Ok(())
    }
}

fn invoke(
    c: &Client,
    out: &Out,
    name: &str,
    data: &str,
    queued: bool,
    key: Option<&str>,
) -> Result<bool> {
    let payload: Value = super::data_arg(data)?;
    if key.is_some() && !queued {
        bail!("--idempotency-key goes with --async (a sync call is not queued)");
    }
    if queued {
        let path = format!("/api/functions/{}/run", encode(name));
        let sent = match key {
            Some(key) => c.post_json_once(&path, &payload, key)?,
            None => c.post_json(&path, &payload)?,
        };
        let body = sent.ok()?;
        out.print(body, |q: &render::Queued| {
            format!("queued task {}", q.task_id)
        })?;
        return Ok(true);
    }
    let body = c
        .post_json(&format!("/api/functions/{}/invoke", encode(name)), &payload)?
        .ok()?;
    let ok = body["status"] == TaskStatus::Succeeded.as_str();
    out.print(body, render::task)?;
    Ok(ok)
}

fn list(c: &Client, out: &Out) -> Result<bool> {
    let body = c.get("/api/functions/")?.ok()?;
    out.print(body, render::functions)?;
    Ok(true)
}

fn status(c: &Client, out: &Out, task: &str) -> Result<bool> {
    if task.starts_with("run_") {
        let run = super::chains::ChainCommand::Status { run: task.into() };
        return super::chains::run(c, out, &run);
    }
    let body = c.get(&format!("/api/tasks/{}", encode(task)))?.ok()?;
    out.print(body, render::task)?;
    Ok(true)
}

fn logs(c: &Client, out: &Out, target: &str) -> Result<bool> {
    if target.starts_with("task_") {
        let body = c.get(&format!("/api/tasks/{}", encode(target)))?.ok()?;
        out.print(body, |t: &Task| t.logs.trim_end().to_string())?;
    } else {
        let body = c
            .get(&format!("/api/functions/{}/tasks?limit=20", encode(target)))?
            .ok()?;
        out.print(body, render::logs)?;
    }
    Ok(true)
}

fn metrics(c: &Client, out: &Out, name: &str, range: &str) -> Result<bool> {
    let body = c
        .get(&format!(
            "/api/functions/{}/metrics?range={}",
            encode(name),
            encode(range)
        ))?
        .ok()?;
    out.print(body, render::metrics)?;
    Ok(true)
}

fn versions(c: &Client, out: &Out, name: &str) -> Result<bool> {
    let body = c
        .get(&format!("/api/functions/{}/versions", encode(name)))?
        .ok()?;
    out.print(body, render::versions)?;
    Ok(true)
}

fn set_active(c: &Client, out: &Out, name: &str, active: bool) -> Result<bool> {
    let verb = if active { "activate" } else { "deactivate" };
    let body = c
        .put(&format!("/api/functions/{}/{verb}", encode(name)))?
        .ok()?;
    out.print(body, |b: &render::Changed| {
        format!("{} is {}", b.name, b.status)
    })?;
    Ok(true)
}

fn rollback(c: &Client, out: &Out, name: &str, to: u32) -> Result<bool> {
    let body = c
        .post_json(
            &format!("/api/functions/{}/rollback", encode(name)),
            &serde_json::json!({ "version": to }),
        )?
        .ok()?;
    out.print(body, |b: &render::Deployed| {
        format!(
            "{} version {} runs version {to}'s code and settings",
            b.name, b.version
        )
    })?;
    Ok(true)
}

fn delete(c: &Client, out: &Out, name: &str) -> Result<bool> {
    let body = c
        .delete(&format!("/api/functions/{}", encode(name)))?
        .ok()?;
    out.print(body, |b: &render::Changed| format!("deleted {}", b.name))?;
    Ok(true)
}
