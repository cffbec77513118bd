//! The Numenta Anomaly Benchmark: its layout on disk (`data/<category>/<file>.csv` with
//! `timestamp,value`, the labelled windows in a JSON file keyed `<category>/<file>.csv`), the
//! result layout a detector writes (`<out>/<detector>/<category>/<detector>_<file>.csv` with
//! `timestamp,value,anomaly_score`), and the scorer ([`score`]).

pub mod score;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Reading or writing NAB's files failed.
#[derive(Debug, thiserror::Error)]
pub enum NabError {
    /// A file could not be read or written.
    #[error("cannot use {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file is not in NAB's format.
    #[error("{path}: {why}")]
    Format { path: PathBuf, why: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> NabError + '_ {
    move |source| NabError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn format(path: &Path, why: impl Into<String>) -> NabError {
    NabError::Format {
        path: path.to_path_buf(),
        why: why.into(),
    }
}

/// One series of the benchmark.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// `category/file.csv`, as the labels name it.
    pub name: String,
    /// The rows' timestamps, as written (`2014-04-01 00:00:00`).
    pub timestamps: Vec<String>,
    /// Seconds since the epoch of each row (UTC, as NAB's timestamps are).
    pub seconds: Vec<i64>,
    /// The values.
    pub values: Vec<f64>,
}

impl Series {
    /// Its category (the data folder it is in).
    pub fn category(&self) -> &str {
        self.name.split_once('/').map_or("", |(c, _)| c)
    }

    /// Its file name.
    pub fn file(&self) -> &str {
        self.name.rsplit_once('/').map_or(&self.name, |(_, f)| f)
    }
}

/// Seconds since the epoch of a timestamp `YYYY-MM-DD HH:MM:SS[.ffffff]`.
pub fn parse_timestamp(text: &str) -> Option<i64> {
    let text = text.trim();
    let (date, time) = text.split_once(' ').or_else(|| text.split_once('T'))?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let time = time.split('.').next()?;
    let mut t = time.split(':').map(|p| p.parse::<i64>().ok());
    let (h, min, s) = (t.next()??, t.next()??, t.next().flatten().unwrap_or(0));
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + min * 60 + s)
}

/// A timestamp as NAB writes it, `YYYY-MM-DD HH:MM:SS`, of seconds since the epoch: the
/// inverse of [`parse_timestamp`].
pub fn format_timestamp(secs: i64) -> String {
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // The civil date of a day count (the same algorithm, backwards).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Reads one CSV of `timestamp,value` rows (a header first).
pub fn read_series(path: &Path, name: &str) -> Result<Series, NabError> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    let mut series = Series {
        name: name.to_string(),
        timestamps: Vec::new(),
        seconds: Vec::new(),
        values: Vec::new(),
    };
    for (n, line) in text.lines().enumerate().skip(1) {
        if line.trim().is_empty() {
            continue;
        }
        let mut cells = line.split(',');
        let (Some(ts), Some(value)) = (cells.next(), cells.next()) else {
            return Err(format(path, format!("line {}: not timestamp,value", n + 1)));
        };
        let seconds = parse_timestamp(ts)
            .ok_or_else(|| format(path, format!("line {}: bad timestamp {ts:?}", n + 1)))?;
        let value: f64 = value
            .trim()
            .parse()
            .map_err(|_| format(path, format!("line {}: bad value {value:?}", n + 1)))?;
        series.timestamps.push(ts.trim().to_string());
        series.seconds.push(seconds);
        series.values.push(value);
    }
    Ok(series)
}

/// Every series under a NAB-style `data` folder (`<category>/<file>.csv`), by name.
pub fn read_corpus(data: &Path) -> Result<Vec<Series>, NabError> {
    let mut out = Vec::new();
    let mut categories: Vec<_> = std::fs::read_dir(data)
        .map_err(io(data))?
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .collect();
    categories.sort_by_key(|e| e.file_name());
    for category in categories {
        let dir = category.path();
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .map_err(io(&dir))?
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "csv"))
            .collect();
        files.sort_by_key(|e| e.file_name());
        for file in files {
            let name = format!(
                "{}/{}",
                category.file_name().to_string_lossy(),
                file.file_name().to_string_lossy()
            );
            out.push(read_series(&file.path(), &name)?);
        }
    }
    Ok(out)
}

/// The labelled windows: by series name, each as (start, end) timestamps.
pub type Windows = BTreeMap<String, Vec<(String, String)>>;

/// Reads NAB's `combined_windows.json`.
pub fn read_windows(path: &Path) -> Result<Windows, NabError> {
    let text = std::fs::read(path).map_err(io(path))?;
    serde_json::from_slice::<BTreeMap<String, Vec<(String, String)>>>(&text)
        .map_err(|e| format(path, e.to_string()))
}

/// A series' windows as row indices: the rows whose timestamps are the window's ends.
pub fn window_rows(
    series: &Series,
    windows: &[(String, String)],
) -> Result<Vec<(usize, usize)>, NabError> {
    let row = |ts: &str| -> Result<usize, NabError> {
        let seconds = parse_timestamp(ts).ok_or_else(|| {
            format(
                Path::new(&series.name),
                format!("bad window timestamp {ts:?}"),
            )
        })?;
        series
            .seconds
            .iter()
            .position(|s| *s == seconds)
            .ok_or_else(|| {
                format(
                    Path::new(&series.name),
                    format!("no row at the window's timestamp {ts}"),
                )
            })
    };
    let mut rows = windows
        .iter()
        .map(|(a, b)| Ok((row(a)?, row(b)?)))
        .collect::<Result<Vec<_>, NabError>>()?;
    rows.sort_unstable();
    Ok(rows)
}

/// Writes a detector's scores of `series` in NAB's result layout under `out`; returns the
/// file written.
pub fn write_result(
    out: &Path,
    detector: &str,
    series: &Series,
    scores: &[f64],
) -> Result<PathBuf, NabError> {
    let dir = out.join(detector).join(series.category());
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let path = dir.join(format!("{detector}_{}", series.file()));
    let mut text = String::from("timestamp,value,anomaly_score\n");
    for ((ts, v), s) in series.timestamps.iter().zip(&series.values).zip(scores) {
        text.push_str(&format!("{ts},{v},{s}\n"));
    }
    std::fs::write(&path, text).map_err(io(&path))?;
    Ok(path)
}

/// Reads a detector's scores of `series` from NAB's result layout under `results` (a
/// `timestamp,...,anomaly_score` CSV, the score being the column so named).
pub fn read_result(results: &Path, detector: &str, series: &Series) -> Result<Vec<f64>, NabError> {
    let path = results
        .join(detector)
        .join(series.category())
        .join(format!("{detector}_{}", series.file()));
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or_default().split(',').collect();
    let column = header
        .iter()
        .position(|h| h.trim() == "anomaly_score")
        .ok_or_else(|| format(&path, "no anomaly_score column"))?;
    let scores: Vec<f64> = lines
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            l.split(',')
                .nth(column)
                .and_then(|c| c.trim().parse().ok())
                .ok_or_else(|| format(&path, format!("bad row {l:?}")))
        })
        .collect::<Result<_, _>>()?;
    if scores.len() != series.values.len() {
        return Err(format(
            &path,
            format!("{} scores for {} rows", scores.len(), series.values.len()),
        ));
    }
    Ok(scores)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_parse_to_epoch_seconds() {
        assert_eq!(parse_timestamp("1970-01-01 00:00:00"), Some(0));
        assert_eq!(
            parse_timestamp("2014-04-10 07:15:00.000000"),
            Some(1_397_114_100)
        );
        assert_eq!(parse_timestamp("2000-03-01 00:00:01"), Some(951_868_801));
        assert_eq!(parse_timestamp("2014-13-10 07:15:00"), None);
        assert_eq!(parse_timestamp("yesterday"), None);
    }

    #[test]
    fn formatting_is_the_inverse_of_parsing() {
        assert_eq!(format_timestamp(1_397_114_100), "2014-04-10 07:15:00");
        for secs in [0, 951_868_801, 1_400_000_000, 4_107_542_399, -86_401] {
            assert_eq!(
                parse_timestamp(&format_timestamp(secs)),
                Some(secs),
                "{secs}"
            );
        }
    }
}
