//! `cloudfunc secrets ...` (set, list, delete) and `cloudfunc keys ...` (status, rotate,
//! reencrypt; admin).

use std::io::Read;

use anyhow::{Context, Result};
use clap::Subcommand;
use serde_json::{json, Value};

use super::client::{encode, Client};
use super::commands::Out;

/// What `secrets` does.
#[derive(Subcommand, Debug)]
pub enum SecretsCommand {
    /// Set a secret. Without VALUE (or with `-`) the value is read from standard input, so
    /// it stays out of the shell's history and the process list.
    Set {
        /// The secret's name, as the functions' environment will have it ([A-Za-z_][A-Za-z0-9_]*).
        name: String,
        /// The value; `-` or none reads it from standard input.
        value: Option<String>,
    },
    /// The secrets' names (values are never shown).
    List,
    /// Delete a secret.
    Delete {
        /// The secret's name.
        name: String,
    },
}

/// What `keys` does.
#[derive(Subcommand, Debug)]
pub enum KeysCommand {
    /// The master key's id and the data keys.
    Status,
    /// A new master key: every data key rewrapped, no record rewritten.
    Rotate,
    /// New data keys, and every record sealed again with them (one tenant, or all).
    Reencrypt {
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Print a new master key (`cfk1:...`), for CLOUDFUNC_MASTER_KEY on several nodes; no
    /// server is asked.
    Generate,
}

/// Runs a `secrets` command.
pub fn secrets(c: &Client, out: &Out, command: &SecretsCommand) -> Result<bool> {
    match command {
        SecretsCommand::Set { name, value } => {
            let value = match value.as_deref() {
                Some(v) if v != "-" => v.to_string(),
                _ => {
                    let mut v = String::new();
                    std::io::stdin()
                        .read_to_string(&mut v)
                        .context("reading the secret from standard input")?;
                    v.strip_suffix('\n').map(String::from).unwrap_or(v)
                }
            };
            let reply = c
                .put_json(
                    &format!("/api/secrets/{}", encode(name)),
                    &json!({ "value": value }),
                )?
                .ok()?;
            out.print(reply, |v: &Value| {
                format!("secret {} set", v["name"].as_str().unwrap_or(""))
            })?;
        }
        SecretsCommand::List => {
            let reply = c.get("/api/secrets")?.ok()?;
            out.print(reply, |v: &Value| {
                let names: Vec<String> = v["secrets"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|s| s["name"].as_str().map(String::from))
                    .collect();
                names.join("\n")
            })?;
        }
        SecretsCommand::Delete { name } => {
            let reply = c.delete(&format!("/api/secrets/{}", encode(name)))?.ok()?;
            out.print(reply, |v: &Value| {
                format!("secret {} deleted", v["name"].as_str().unwrap_or(""))
            })?;
        }
    }
    Ok(true)
}

fn key_text(v: &Value) -> String {
    let mut lines = vec![format!(
        "master key {}{}",
        v["master_key"].as_str().unwrap_or(""),
        if v["sealing"] == false {
            " (new records NOT encrypted: --no-encryption-at-rest)"
        } else {
            ""
        }
    )];
    for k in v["data_keys"].as_array().into_iter().flatten() {
        lines.push(format!(
            "  data key {} of {}{}",
            k["id"],
            k["tenant"].as_str().unwrap_or(""),
            if k["retired"] == true {
                " (retired)"
            } else {
                ""
            }
        ));
    }
    lines.join("\n")
}

/// Runs a `keys` command.
pub fn keys(c: &Client, out: &Out, command: &KeysCommand) -> Result<bool> {
    let reply = match command {
        KeysCommand::Generate => {
            super::say(crate::atrest::MasterKey::generate().encode())?;
            return Ok(true);
        }
        KeysCommand::Status => c.get("/api/system/keys")?.ok()?,
        KeysCommand::Rotate => c.post_json("/api/system/keys/rotate", &json!({}))?.ok()?,
        KeysCommand::Reencrypt { tenant } => {
            let body = match tenant {
                Some(t) => json!({ "tenant": t }),
                None => json!({}),
            };
            let reply = c.post_json("/api/system/keys/reencrypt", &body)?.ok()?;
            out.print(reply, |v: &Value| {
                format!(
                    "{} records sealed again under {} new data keys; {} old keys removed",
                    v["records"],
                    v["keys"].as_array().map_or(0, Vec::len),
                    v["retired_keys_removed"]
                )
            })?;
            return Ok(true);
        }
    };
    out.print(reply, key_text)?;
    Ok(true)
}
