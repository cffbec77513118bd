//! `cloudfunc deploy PATH`: a directory, a ZIP or a single code file, as a new function or
//! its next version. Without `--name`, the name is the one the code's manifest
//! (`cloudfunc.toml`, `manifest.json`) gives, else one made of the path's name.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use cloudfunc_sandbox::Runtime;

use super::client::{encode, Client};
use super::commands::Out;
use super::render::Deployed;
use crate::archive::{self, ArchiveLimits};
use crate::isolation::Isolation;
use crate::model::name_from;
use crate::platform::Settings;

/// What `deploy` takes.
#[derive(Args, Debug)]
pub struct DeployArgs {
    /// A directory, a .zip, or one code file.
    pub path: PathBuf,
    /// The function's name (default: the manifest's, else the path's).
    #[arg(long)]
    pub name: Option<String>,
    /// python or node (default: guessed from the file names).
    #[arg(long)]
    pub runtime: Option<Runtime>,
    /// module.function (default: the runtime's conventions).
    #[arg(long)]
    pub handler: Option<String>,
    /// Seconds.
    #[arg(long)]
    pub timeout: Option<f64>,
    /// MiB.
    #[arg(long)]
    pub memory: Option<u64>,
    /// container or gvisor (default: the server's).
    #[arg(long)]
    pub isolation: Option<Isolation>,
}

/// Deploys and prints what the server stored.
pub fn deploy(c: &Client, out: &Out, args: &DeployArgs) -> Result<bool> {
    let zip = archive_of(&args.path)?;
    let mut query = Vec::new();
    let name = match &args.name {
        Some(name) => Some(name.clone()),
        None if manifest_names(&zip)? => None,
        None => default_name(&args.path),
    };
    let fields = [
        ("name", name),
        ("runtime", args.runtime.map(|r| r.name().to_string())),
        ("handler", args.handler.clone()),
        ("timeout", args.timeout.map(|t| t.to_string())),
        ("memory", args.memory.map(|m| m.to_string())),
        ("isolation", args.isolation.map(|i| i.to_string())),
    ];
    for (k, v) in fields {
        if let Some(v) = v {
            query.push(format!("{k}={}", encode(&v)));
        }
    }
    let body = c
        .post_zip(&format!("/api/functions/deploy?{}", query.join("&")), &zip)?
        .ok()?;
    out.print(body, |b: &Deployed| {
        format!(
            "deployed {} version {} ({}, {} isolation)",
            b.name, b.version, b.id, b.isolation
        )
    })?;
    Ok(true)
}

/// The code as a ZIP: a directory zipped, a ZIP as it is, a single file zipped alone.
fn archive_of(path: &Path) -> Result<Vec<u8>> {
    if path.is_dir() {
        return archive::zip_dir(path).with_context(|| format!("zipping {}", path.display()));
    }
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if bytes.starts_with(b"PK\x03\x04") {
        return Ok(bytes);
    }
    let dir = tempfile::tempdir()?;
    let name = path.file_name().context("the file has no name")?;
    std::fs::write(dir.path().join(name), &bytes)?;
    Ok(archive::zip_dir(dir.path())?)
}

/// Whether the archive's manifest names the function (the server then takes that name).
fn manifest_names(zip: &[u8]) -> Result<bool> {
    let dir = tempfile::tempdir()?;
    let code = dir.path().join("code");
    if archive::extract(zip, &code, ArchiveLimits::default()).is_err() {
        // The server says what is wrong with it.
        return Ok(false);
    }
    let settings = Settings::from_code_dir(&code).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(settings.name.is_some())
}

/// A name made of the path's: a directory's whole name, a file's without its extension.
fn default_name(path: &Path) -> Option<String> {
    let path = path.canonicalize().ok()?;
    let base = if path.is_dir() {
        path.file_name()?
    } else {
        path.file_stem()?
    };
    name_from(&base.to_string_lossy())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manifest_names_the_function_and_a_dotted_directory_keeps_its_whole_name() {
        let dir = tempfile::tempdir().unwrap();
        let named = dir.path().join("anything");
        std::fs::create_dir(&named).unwrap();
        std::fs::write(named.join("function.py"), "").unwrap();
        std::fs::write(named.join("cloudfunc.toml"), "name = \"from-manifest\"\n").unwrap();
        assert!(manifest_names(&archive_of(&named).unwrap()).unwrap());

        let dotted = dir.path().join("My.Func");
        std::fs::create_dir(&dotted).unwrap();
        std::fs::write(dotted.join("function.py"), "").unwrap();
        assert!(!manifest_names(&archive_of(&dotted).unwrap()).unwrap());
        assert_eq!(default_name(&dotted).as_deref(), Some("my_func"));
        let file = dir.path().join("handler.py");
        std::fs::write(&file, "").unwrap();
        assert_eq!(default_name(&file).as_deref(), Some("handler"));
    }
}
