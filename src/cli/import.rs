//! `tally order import FILE`: orders from JSON lines through `POST /api/orders/batch`.
//!
//! - Every line is an order as `POST /api/orders` takes it, plus an optional
//!   `idempotency_key`. A line without one gets `import:<sha256 of the line>:<line number>`,
//!   so a second run over the same file creates nothing twice (its orders come back
//!   "replayed").
//! - A line that is not a JSON object fails alone and is not sent; an order the API refuses
//!   fails alone; the summary lists each failure by line number and field, and the exit code
//!   is 1 if there was any.
//! - A call refused as a whole (503, the API unreachable) is sent again with backoff: the
//!   keys make that safe. When the API stays away, the import stops with exit 5 and says that
//!   running it again is safe.

use std::io::{BufRead, IsTerminal, Write};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{CliError, CliResult, Client, print_json};
use crate::http::sha256_hex;

/// Sends of one chunk before giving up.
const TRIES: u32 = 6;

#[derive(Debug, Default)]
struct Tally {
    lines: usize,
    created: usize,
    replayed: usize,
    /// (line number, field, message)
    failed: Vec<(usize, String, String)>,
}

pub(super) async fn run(
    c: &Client,
    file: &str,
    batch_size: usize,
    json_out: bool,
) -> CliResult<u8> {
    if !(1..=1000).contains(&batch_size) {
        return Err(CliError {
            code: 2,
            message: "--batch-size must be between 1 and 1000".into(),
        });
    }
    let reader: Box<dyn BufRead> = if file == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::io::BufReader::new(std::fs::File::open(file).map_err(
            |e| CliError {
                code: 2,
                message: format!("cannot read {file}: {e}"),
            },
        )?))
    };
    let total = if file == "-" {
        None
    } else {
        std::fs::read(file).ok().map(|b| {
            b.split(|c| *c == b'\n')
                .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
                .count()
        })
    };
    let started = Instant::now();
    let mut tally = Tally::default();
    let mut chunk: Vec<(usize, Value)> = Vec::with_capacity(batch_size);
    let progress = Progress::new(total, json_out);
    for (i, line) in reader.lines().enumerate() {
        let line_no = i + 1;
        let line = line.map_err(|e| CliError {
            code: 2,
            message: format!("reading {file}, line {line_no}: {e}"),
        })?;
        if line.trim().is_empty() {
            continue;
        }
        tally.lines += 1;
        match parse_line(&line, line_no) {
            Ok(order) => chunk.push((line_no, order)),
            Err((field, message)) => tally.failed.push((line_no, field, message)),
        }
        if chunk.len() == batch_size {
            send(c, &mut chunk, &mut tally).await?;
            progress.show(&tally, started);
        }
    }
    if !chunk.is_empty() {
        send(c, &mut chunk, &mut tally).await?;
    }
    progress.done(&tally, started);
    tally.failed.sort_by_key(|(line, _, _)| *line);
    let secs = started.elapsed().as_secs_f64();
    if json_out {
        print_json(&json!({
            "lines": tally.lines,
            "created": tally.created,
            "replayed": tally.replayed,
            "failed": tally.failed.len(),
            "seconds": (secs * 1000.0).round() / 1000.0,
            "failures": tally.failed.iter().map(|(l, f, m)| json!({"line": l, "field": f, "message": m})).collect::<Vec<_>>(),
        }));
    } else {
        println!(
            "{} lines: {} created, {} replayed, {} failed in {:.1} s ({:.0} orders/s)",
            tally.lines,
            tally.created,
            tally.replayed,
            tally.failed.len(),
            secs,
            (tally.created + tally.replayed) as f64 / secs.max(1e-3)
        );
        for (line, field, message) in tally.failed.iter().take(20) {
            println!("  line {line}: {field}: {message}");
        }
        if tally.failed.len() > 20 {
            println!(
                "  … and {} more (--json lists them all)",
                tally.failed.len() - 20
            );
        }
    }
    Ok(u8::from(!tally.failed.is_empty()))
}

/// One line as a batch item; its key is derived from the line when it has none.
fn parse_line(line: &str, line_no: usize) -> Result<Value, (String, String)> {
    let mut v: Value = serde_json::from_str(line)
        .map_err(|e| ("line".to_owned(), format!("is not valid JSON: {e}")))?;
    let Some(obj) = v.as_object_mut() else {
        return Err(("line".into(), "must be a JSON object (one order)".into()));
    };
    if obj.get("idempotency_key").is_none_or(Value::is_null) {
        obj.insert(
            "idempotency_key".into(),
            Value::String(format!(
                "import:{}:{line_no}",
                &sha256_hex(line.as_bytes())[..32]
            )),
        );
    }
    Ok(v)
}

/// Sends one chunk (again while the API refuses it as a whole) and counts its answers.
async fn send(c: &Client, chunk: &mut Vec<(usize, Value)>, tally: &mut Tally) -> CliResult<()> {
    let body = json!({"orders": chunk.iter().map(|(_, o)| o).collect::<Vec<_>>()});
    let mut wait = Duration::from_millis(250);
    let mut tries = 0;
    let answer = loop {
        tries += 1;
        match c
            .call(
                reqwest::Method::POST,
                "/api/orders/batch",
                Some(body.clone()),
            )
            .await
        {
            Ok(v) => break v,
            Err(e) if e.code == 5 && tries < TRIES => {
                eprintln!(
                    "warning: {}; sending line {} onwards again in {wait:?}",
                    e.message, chunk[0].0
                );
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(8));
            }
            Err(e) => {
                let hint = if e.code == 5 {
                    format!(
                        "\nhint: lines before {} were sent; running the same import again is safe (the orders' keys make it create nothing twice)",
                        chunk[0].0
                    )
                } else {
                    String::new()
                };
                return Err(CliError {
                    code: e.code,
                    message: format!("{}{hint}", e.message),
                });
            }
        }
    };
    let results = answer["results"].as_array().cloned().unwrap_or_default();
    for r in results {
        let Some(&(line_no, _)) = r["index"].as_u64().and_then(|i| chunk.get(i as usize)) else {
            continue;
        };
        match r["outcome"].as_str() {
            Some("created") => tally.created += 1,
            Some("replayed") => tally.replayed += 1,
            _ => tally.failed.push((
                line_no,
                r["error"]["field"].as_str().unwrap_or("order").to_owned(),
                r["error"]["message"]
                    .as_str()
                    .unwrap_or("refused")
                    .to_owned(),
            )),
        }
    }
    chunk.clear();
    Ok(())
}

/// A progress line on standard error when it is a terminal.
struct Progress {
    total: Option<usize>,
    on: bool,
}

impl Progress {
    fn new(total: Option<usize>, json_out: bool) -> Self {
        Self {
            total,
            on: !json_out && std::io::stderr().is_terminal(),
        }
    }

    fn show(&self, t: &Tally, started: Instant) {
        if !self.on {
            return;
        }
        let done = t.lines;
        let bar = match self.total {
            Some(total) if total > 0 => {
                let filled = (30 * done.min(total)) / total;
                format!(
                    "[{}{}] {done}/{total}",
                    "#".repeat(filled),
                    ".".repeat(30 - filled)
                )
            }
            _ => format!("{done} lines"),
        };
        let rate = (t.created + t.replayed) as f64 / started.elapsed().as_secs_f64().max(1e-3);
        let mut err = std::io::stderr();
        let _ = write!(
            err,
            "\r{bar}  created {} replayed {} failed {}  {rate:.0}/s ",
            t.created,
            t.replayed,
            t.failed.len()
        );
        let _ = err.flush();
    }

    fn done(&self, t: &Tally, started: Instant) {
        if self.on {
            self.show(t, started);
            eprintln!();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_without_a_key_gets_one_from_its_text_and_number() {
        let a = parse_line(r#"{"kind":"k","target":"t","quantity":1}"#, 7).unwrap();
        let b = parse_line(r#"{"kind":"k","target":"t","quantity":1}"#, 7).unwrap();
        let c = parse_line(r#"{"kind":"k","target":"t","quantity":1}"#, 8).unwrap();
        assert_eq!(a["idempotency_key"], b["idempotency_key"]);
        assert_ne!(a["idempotency_key"], c["idempotency_key"]);
        let own = parse_line(r#"{"kind":"k","idempotency_key":"mine"}"#, 1).unwrap();
        assert_eq!(own["idempotency_key"], "mine");
        assert_eq!(parse_line("[1]", 1).unwrap_err().0, "line");
        assert_eq!(parse_line("{oops", 1).unwrap_err().0, "line");
    }
}
