//! Throwaway PostgreSQL clusters built from the machine's own server binaries.
//!
//! [`TempCluster::start`] runs `initdb` into a fresh `tally-pg-<uuid>`
//! directory, writes a small `postgresql.conf` overlay and starts the server
//! with `pg_ctl` on a free TCP port on `127.0.0.1`. Dropping the
//! [`TempCluster`] stops the server (`pg_ctl stop -m immediate`) and removes
//! the directory unless [`ClusterOptions::keep`] is set.
//!
//! Everything here is synchronous (`std::process::Command`); async callers
//! should wrap [`TempCluster::start`], [`TempCluster::stop`],
//! [`TempCluster::restart_after_stop`] and the final drop in
//! `tokio::task::spawn_blocking`.
//!
//! `initdb` and `postgres` refuse to run as root, so when the effective uid is
//! 0 every PostgreSQL binary (including `pg_ctl`) is run as the unprivileged
//! `postgres` user (or `nobody` if there is no `postgres` user) through
//! `runuser -u USER -- ...`, and the cluster directory is owned by that user.

use std::ffi::{CString, OsStr, OsString};
use std::fmt::Write as _;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::mem::MaybeUninit;
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt, chown};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

/// Environment variable that overrides binary discovery.
const BINDIR_ENV: &str = "TALLY_PG_BINDIR";
/// Where Debian/Ubuntu install versioned PostgreSQL server binaries.
const DEBIAN_PG_ROOT: &str = "/usr/lib/postgresql";
/// Binaries that must all be present in the bin directory.
const REQUIRED_BINARIES: [&str; 3] = ["initdb", "pg_ctl", "postgres"];
/// Name of the database superuser created by `initdb`.
const SUPERUSER: &str = "postgres";
/// Timeout handed to `pg_ctl -t` (seconds).
const PG_CTL_TIMEOUT_SECS: &str = "60";
/// How many output / log lines error messages include.
const ERROR_TAIL_LINES: usize = 20;
/// How often `start` retries with a new port when the chosen one was taken.
const START_ATTEMPTS: usize = 5;
/// Unprivileged OS users tried (in order) when running as root.
const RUN_AS_CANDIDATES: [&str; 2] = ["postgres", "nobody"];

/// Options for [`TempCluster::start`].
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// Durable keeps `fsync`/`synchronous_commit`/`full_page_writes` on (benchmarks); fast turns them off (tests, demo).
    pub durable: bool,
    /// Extra `name = value` lines appended to postgresql.conf.
    ///
    /// Names must be plain GUC names (`[A-Za-z0-9_.]`). Values are written as
    /// quoted string literals (PostgreSQL accepts that for every setting
    /// type); a value already wrapped in single quotes is written verbatim.
    /// These lines come after the built-in settings, so they override them,
    /// except `port`, which is always chosen by [`TempCluster::start`].
    pub extra_settings: Vec<(String, String)>,
    /// Preferred base directory for the cluster (default [`std::env::temp_dir()`]); a unique subdirectory `tally-pg-<uuid>` is created in it.
    ///
    /// When running as root, every parent directory must be searchable by the
    /// unprivileged user the cluster runs as (`/tmp` is fine, `/root/...` is not).
    /// Keep the path short: the Unix socket path inside it is limited to 107 bytes.
    pub base_dir: Option<PathBuf>,
    /// Keep the directory on drop (for debugging)
    pub keep: bool,
}

/// Errors from creating, starting or stopping a [`TempCluster`].
#[derive(Debug, thiserror::Error)]
pub enum PgTempError {
    /// The PostgreSQL server binaries (`initdb`, `pg_ctl`, `postgres`) were not found.
    #[error(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found; looked in: {searched_list}. \
         Install them with `apt-get install postgresql` (Debian/Ubuntu; a versioned package such as \
         postgresql-15 works too), or set TALLY_PG_BINDIR to the directory that contains initdb and pg_ctl, \
         or pass --database-url to use an existing PostgreSQL server instead",
        searched_list = display_paths(.searched)
    )]
    BinariesNotFound {
        /// Directories (or patterns) that were searched, in order.
        searched: Vec<PathBuf>,
    },
    /// A command failed; `what` names it (with its command line) and `detail`
    /// has the exit status and the tail of its output and/or the server log.
    #[error("{what} failed: {detail}")]
    Command {
        /// The operation or command line that failed.
        what: String,
        /// Exit status plus the last lines of the command's output or of the server log.
        detail: String,
    },
    /// A filesystem or process-spawning error.
    #[error("I/O error while managing the temporary PostgreSQL cluster: {0}")]
    Io(#[from] io::Error),
}

/// A throwaway PostgreSQL cluster; stopped and deleted on drop.
///
/// Layout of [`TempCluster::dir`]: `data/` (the cluster), `sock/` (Unix
/// socket directory) and `server.log`. The superuser is `postgres` with
/// `trust` authentication, so no password is needed.
#[derive(Debug)]
pub struct TempCluster {
    /// The `tally-pg-<uuid>` directory.
    root: PathBuf,
    /// `root/data`, the PostgreSQL data directory.
    data: PathBuf,
    /// `root/server.log`, the server log written by `pg_ctl -l`.
    log: PathBuf,
    /// TCP port on 127.0.0.1.
    port: u16,
    /// How PostgreSQL binaries are invoked.
    runner: Runner,
    /// Keep `root` on drop.
    keep: bool,
}

impl TempCluster {
    /// Find binaries: env `TALLY_PG_BINDIR` if set; else `pg_config --bindir` if it yields a dir with `initdb`; else the highest-numbered `/usr/lib/postgresql/*/bin` containing `initdb` and `pg_ctl`; else `initdb` on `PATH`.
    ///
    /// A directory qualifies when it contains executable `initdb`, `pg_ctl`
    /// and `postgres`. If `TALLY_PG_BINDIR` is set but does not qualify, that
    /// is an error (no silent fallback).
    pub fn find_bindir() -> Result<PathBuf, PgTempError> {
        if let Some(dir) = std::env::var_os(BINDIR_ENV).filter(|v| !v.is_empty()) {
            let dir = PathBuf::from(dir);
            if has_server_binaries(&dir) {
                return Ok(dir);
            }
            return Err(PgTempError::BinariesNotFound {
                searched: vec![dir],
            });
        }

        let mut searched = Vec::new();

        if let Some(dir) = pg_config_bindir() {
            if has_server_binaries(&dir) {
                return Ok(dir);
            }
            searched.push(dir);
        }

        let versioned = debian_bindirs();
        if versioned.is_empty() {
            searched.push(Path::new(DEBIAN_PG_ROOT).join("*").join("bin"));
        }
        for dir in versioned {
            if has_server_binaries(&dir) {
                return Ok(dir);
            }
            searched.push(dir);
        }

        if let Some(path) = std::env::var_os("PATH") {
            for dir in std::env::split_paths(&path) {
                if dir.as_os_str().is_empty() {
                    continue;
                }
                if has_server_binaries(&dir) {
                    return Ok(dir);
                }
                searched.push(dir);
            }
        }

        Err(PgTempError::BinariesNotFound { searched })
    }

    /// `initdb` (`--no-sync`, `-U postgres` superuser, `--auth=trust`, `-E UTF8`, `--no-locale`) + start on a free TCP port on 127.0.0.1 (bind a [`std::net::TcpListener`] to `127.0.0.1:0` to pick it, then drop it) with `pg_ctl -w -t 60 start -l <dir>/server.log`.
    ///
    /// Settings written to `postgresql.conf`: `listen_addresses='127.0.0.1'`, `port`,
    /// `unix_socket_directories=<dir>/sock`, `max_connections=200`, `shared_buffers=256MB`,
    /// `fsync`/`synchronous_commit`/`full_page_writes` per [`ClusterOptions::durable`], `jit=off`,
    /// `log_min_messages=warning`, plus [`ClusterOptions::extra_settings`].
    ///
    /// If the picked port is grabbed by someone else before the server binds
    /// it, a new port is picked and the start retried (a few times). On any
    /// error the partially created cluster is stopped and its directory
    /// removed (unless `keep`); the error carries the relevant output/log tail.
    /// Blocks for roughly a second; call it from `spawn_blocking` in async code.
    pub fn start(opts: ClusterOptions) -> Result<TempCluster, PgTempError> {
        let ClusterOptions {
            durable,
            extra_settings,
            base_dir,
            keep,
        } = opts;
        for (name, value) in &extra_settings {
            validate_setting(name, value)?;
        }
        let bindir = Self::find_bindir()?;
        let run_as = run_as_user()?;

        let base = base_dir.unwrap_or_else(std::env::temp_dir);
        fs::create_dir_all(&base).map_err(with_context(format!("creating {}", base.display())))?;
        let root = base.join(format!("tally-pg-{}", uuid::Uuid::new_v4()));
        DirBuilder::new()
            .mode(0o700)
            .create(&root)
            .map_err(with_context(format!("creating {}", root.display())))?;

        // From here on, dropping `cluster` (e.g. via `?`) cleans everything up.
        let mut cluster = TempCluster {
            data: root.join("data"),
            log: root.join("server.log"),
            port: 0,
            runner: Runner {
                bindir,
                run_as,
                cwd: root.clone(),
            },
            keep,
            root,
        };
        tracing::debug!(
            dir = %cluster.root.display(),
            bindir = %cluster.runner.bindir.display(),
            run_as = ?cluster.runner.run_as.as_ref().map(|u| &u.name),
            "creating temporary PostgreSQL cluster"
        );

        let sock = cluster.root.join("sock");
        DirBuilder::new()
            .mode(0o700)
            .create(&sock)
            .map_err(with_context(format!("creating {}", sock.display())))?;
        if let Some(user) = &cluster.runner.run_as {
            for dir in [&cluster.root, &sock] {
                chown(dir, Some(user.uid), Some(user.gid)).map_err(with_context(format!(
                    "changing owner of {} to {}",
                    dir.display(),
                    user.name
                )))?;
            }
        }

        cluster.initdb()?;
        cluster.append_conf(&base_config(durable, &extra_settings, &sock)?)?;
        cluster.start_on_free_port()?;
        tracing::debug!(
            port = cluster.port,
            dir = %cluster.root.display(),
            "temporary PostgreSQL cluster started"
        );
        Ok(cluster)
    }

    /// TCP port the server listens on (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The cluster's `tally-pg-<uuid>` directory (contains `data/`, `sock/` and `server.log`).
    pub fn dir(&self) -> &Path {
        &self.root
    }

    /// postgres://postgres@127.0.0.1:PORT/DB
    ///
    /// `db` is percent-encoded where needed. The database must exist; only
    /// `postgres` (plus `template0`/`template1`) exists after `start`.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://{SUPERUSER}@127.0.0.1:{}/{}",
            self.port,
            percent_encode(db)
        )
    }

    /// Stop with the given mode ("fast" or "immediate") and wait.
    ///
    /// `"smart"` is accepted too. Fails if the server is not running.
    pub fn stop(&self, mode: &str) -> Result<(), PgTempError> {
        if !matches!(mode, "smart" | "fast" | "immediate") {
            return Err(PgTempError::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid pg_ctl stop mode {mode:?} (expected \"fast\" or \"immediate\")"),
            )));
        }
        let out = self.runner.run(
            "pg_ctl",
            &[
                &"-D",
                &self.data,
                &"-w",
                &"-t",
                &PG_CTL_TIMEOUT_SECS,
                &"-m",
                &mode,
                &"stop",
            ],
        )?;
        if out.status.success() {
            Ok(())
        } else {
            Err(out.failure(Some(self.log_section())))
        }
    }

    /// Start again after stop (same port, same data).
    ///
    /// Runs crash recovery first if the server was stopped with `immediate`.
    /// Fails (with the server log tail) if the port has been taken meanwhile.
    pub fn restart_after_stop(&self) -> Result<(), PgTempError> {
        self.pg_ctl_start()
    }

    /// Server log tail for error messages.
    ///
    /// Returns the last `lines` lines of `server.log`, or a short note if the
    /// log cannot be read.
    pub fn log_tail(&self, lines: usize) -> String {
        match read_tail(&self.log, lines) {
            Ok(text) => text,
            Err(err) => format!("(could not read server log {}: {err})", self.log.display()),
        }
    }

    /// Runs `initdb` into `self.data`.
    fn initdb(&self) -> Result<(), PgTempError> {
        let out = self.runner.run(
            "initdb",
            &[
                &"-D",
                &self.data,
                &"--no-sync",
                &"-U",
                &SUPERUSER,
                &"--auth=trust",
                &"-E",
                &"UTF8",
                &"--no-locale",
            ],
        )?;
        if out.status.success() {
            return Ok(());
        }
        let hint = self.runner.run_as.as_ref().map(|user| {
            format!(
                "note: this process runs as root, so PostgreSQL runs as OS user `{}`; every parent \
                 directory of {} must be searchable by that user (pick another base directory / TMPDIR otherwise)",
                user.name,
                self.root.display()
            )
        });
        Err(out.failure(hint))
    }

    /// Appends `text` to `data/postgresql.conf` (later lines win in PostgreSQL).
    fn append_conf(&self, text: &str) -> Result<(), PgTempError> {
        let path = self.data.join("postgresql.conf");
        let mut file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(with_context(format!("opening {}", path.display())))?;
        file.write_all(text.as_bytes())
            .map_err(with_context(format!("writing {}", path.display())))?;
        Ok(())
    }

    /// Picks a free port, writes it to the config and starts the server,
    /// retrying with a new port if the chosen one was taken in the meantime.
    fn start_on_free_port(&mut self) -> Result<(), PgTempError> {
        let mut attempt = 1;
        loop {
            let port = pick_free_port()?;
            self.append_conf(&format!("port = {port}\n"))?;
            self.port = port;
            let log_offset = fs::metadata(&self.log).map_or(0, |m| m.len());
            match self.pg_ctl_start() {
                Ok(()) => return Ok(()),
                Err(_) if attempt < START_ATTEMPTS && self.port_conflict_since(log_offset) => {
                    tracing::debug!(
                        port,
                        attempt,
                        "port was taken before PostgreSQL bound it; retrying"
                    );
                    attempt += 1;
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// Whether the server log written after byte `offset` reports a port conflict.
    fn port_conflict_since(&self, offset: u64) -> bool {
        let Ok(mut file) = File::open(&self.log) else {
            return false;
        };
        let mut buf = Vec::new();
        if file.seek(SeekFrom::Start(offset)).is_err() || file.read_to_end(&mut buf).is_err() {
            return false;
        }
        let text = String::from_utf8_lossy(&buf);
        text.contains("Address already in use")
            || text.contains("could not create any TCP/IP sockets")
    }

    /// `pg_ctl -w start`, with the server log tail on failure.
    fn pg_ctl_start(&self) -> Result<(), PgTempError> {
        let out = self.runner.run(
            "pg_ctl",
            &[
                &"-D",
                &self.data,
                &"-w",
                &"-t",
                &PG_CTL_TIMEOUT_SECS,
                &"-l",
                &self.log,
                &"start",
            ],
        )?;
        if out.status.success() {
            Ok(())
        } else {
            Err(out.failure(Some(self.log_section())))
        }
    }

    /// Server log tail formatted for inclusion in error details.
    fn log_section(&self) -> String {
        format!(
            "server log {} (last {ERROR_TAIL_LINES} lines):\n{}",
            self.log.display(),
            self.log_tail(ERROR_TAIL_LINES)
        )
    }
}

impl Drop for TempCluster {
    /// `pg_ctl stop -m immediate` (errors ignored), then removes the directory unless `keep`.
    fn drop(&mut self) {
        // Only bother pg_ctl if a postmaster may be running (no pid file: never
        // started, already stopped, or initdb failed).
        if self.data.join("postmaster.pid").exists() {
            match self.runner.run(
                "pg_ctl",
                &[
                    &"-D",
                    &self.data,
                    &"-w",
                    &"-t",
                    &PG_CTL_TIMEOUT_SECS,
                    &"-m",
                    &"immediate",
                    &"stop",
                ],
            ) {
                Ok(out) if !out.status.success() => {
                    tracing::debug!(
                        command = %out.line,
                        status = %out.status,
                        output = %out.output.trim(),
                        "stopping temporary PostgreSQL cluster failed"
                    );
                }
                Ok(_) => {}
                Err(err) => {
                    tracing::debug!(error = %err, "stopping temporary PostgreSQL cluster failed");
                }
            }
        }
        if self.keep {
            tracing::info!(dir = %self.root.display(), "keeping temporary PostgreSQL cluster directory");
            return;
        }
        if let Err(err) = fs::remove_dir_all(&self.root) {
            tracing::warn!(
                dir = %self.root.display(),
                error = %err,
                "could not remove temporary PostgreSQL cluster directory"
            );
        }
    }
}

/// The unprivileged OS user PostgreSQL runs as when this process is root.
#[derive(Debug, Clone)]
struct RunAs {
    /// User name, passed to `runuser -u`.
    name: String,
    /// Numeric uid (owner of the cluster directory).
    uid: libc::uid_t,
    /// Numeric primary gid.
    gid: libc::gid_t,
}

/// Runs PostgreSQL binaries, via `runuser` when needed.
#[derive(Debug)]
struct Runner {
    /// Directory holding `initdb`, `pg_ctl` and `postgres`.
    bindir: PathBuf,
    /// `Some` when running as root.
    run_as: Option<RunAs>,
    /// Working directory for commands (must be accessible to the run-as user).
    cwd: PathBuf,
}

/// Result of a finished command.
#[derive(Debug)]
struct Outcome {
    /// Shell-style rendering of the command line.
    line: String,
    /// Exit status.
    status: ExitStatus,
    /// stdout followed by stderr (lossily decoded).
    output: String,
}

impl Runner {
    /// Runs `bindir/bin args...` (prefixed with `runuser -u USER --` when root)
    /// with `LC_ALL=C`, stdin from /dev/null, capturing stdout and stderr.
    fn run(&self, bin: &str, args: &[&dyn AsRef<OsStr>]) -> Result<Outcome, PgTempError> {
        let program = self.bindir.join(bin);
        let mut words: Vec<OsString> = Vec::with_capacity(args.len() + 5);
        if let Some(user) = &self.run_as {
            words.extend(["runuser", "-u", user.name.as_str(), "--"].map(OsString::from));
        }
        words.push(program.into_os_string());
        words.extend(args.iter().map(|a| a.as_ref().to_os_string()));

        let line = command_line(&words);
        tracing::debug!(command = %line, "running PostgreSQL command");
        let (exe, rest) = words
            .split_first()
            .ok_or_else(|| io::Error::other("empty command line"))?;
        let output = Command::new(exe)
            .args(rest)
            .current_dir(&self.cwd)
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .output()
            .map_err(|err| PgTempError::Command {
                what: format!("`{line}`"),
                detail: format!("could not be started: {err}"),
            })?;

        let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&String::from_utf8_lossy(&output.stderr));
        Ok(Outcome {
            line,
            status: output.status,
            output: text,
        })
    }
}

impl Outcome {
    /// Builds a [`PgTempError::Command`] with exit status, output tail and an optional extra section.
    fn failure(&self, extra: Option<String>) -> PgTempError {
        let mut detail = self.status.to_string();
        let tail = last_lines(&self.output, ERROR_TAIL_LINES);
        if tail.trim().is_empty() {
            detail.push_str(" (no output)");
        } else {
            let _ = write!(detail, "; output (last {ERROR_TAIL_LINES} lines):\n{tail}");
        }
        if let Some(extra) = extra {
            detail.push('\n');
            detail.push_str(&extra);
        }
        PgTempError::Command {
            what: format!("`{}`", self.line),
            detail,
        }
    }
}

/// Decides which OS user runs PostgreSQL: `None` (ourselves) unless we are root.
fn run_as_user() -> Result<Option<RunAs>, PgTempError> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    for name in RUN_AS_CANDIDATES {
        if let Some((uid, gid)) = lookup_user(name)
            && uid != 0
        {
            return Ok(Some(RunAs {
                name: name.to_owned(),
                uid,
                gid,
            }));
        }
    }
    Err(PgTempError::Command {
        what: "choosing an unprivileged OS user to run PostgreSQL as".to_owned(),
        detail: "this process runs as root, initdb/postgres refuse to run as root, and neither a \
                 `postgres` nor a `nobody` user exists; create one (`apt-get install postgresql` \
                 creates `postgres`), run tally as an ordinary user, or pass --database-url to use \
                 an existing PostgreSQL server"
            .to_owned(),
    })
}

/// Looks up `name` in the user database; returns `(uid, primary gid)`.
fn lookup_user(name: &str) -> Option<(libc::uid_t, libc::gid_t)> {
    let cname = CString::new(name).ok()?;
    let mut buf: Vec<libc::c_char> = vec![0; 4096];
    loop {
        let mut pwd = MaybeUninit::<libc::passwd>::uninit();
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: all pointers are valid for the duration of the call; `buf`
        // has `buf.len()` writable bytes; getpwnam_r is thread-safe.
        let rc = unsafe {
            libc::getpwnam_r(
                cname.as_ptr(),
                pwd.as_mut_ptr(),
                buf.as_mut_ptr(),
                buf.len(),
                &raw mut result,
            )
        };
        if rc == libc::ERANGE && buf.len() < (1 << 20) {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if rc != 0 || result.is_null() {
            return None;
        }
        // SAFETY: on success with a non-null result, getpwnam_r initialized `pwd`.
        let pwd = unsafe { pwd.assume_init_ref() };
        return Some((pwd.pw_uid, pwd.pw_gid));
    }
}

/// Whether `dir` holds executable `initdb`, `pg_ctl` and `postgres`.
fn has_server_binaries(dir: &Path) -> bool {
    REQUIRED_BINARIES.iter().all(|bin| {
        fs::metadata(dir.join(bin))
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

/// `pg_config --bindir`, if `pg_config` is on PATH and succeeds.
fn pg_config_bindir() -> Option<PathBuf> {
    let output = Command::new("pg_config")
        .arg("--bindir")
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    let text = String::from_utf8(output.stdout).ok()?;
    let dir = text.trim();
    (!dir.is_empty()).then(|| PathBuf::from(dir))
}

/// `/usr/lib/postgresql/<version>/bin` directories, highest version first
/// (versions compared numerically, so 10 > 9.6).
fn debian_bindirs() -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(DEBIAN_PG_ROOT) else {
        return Vec::new();
    };
    let mut found: Vec<(Vec<u32>, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name();
            let version = name
                .to_str()?
                .split('.')
                .map(|part| part.parse::<u32>().ok())
                .collect::<Option<Vec<u32>>>()?;
            Some((version, entry.path().join("bin")))
        })
        .collect();
    found.sort();
    found.into_iter().rev().map(|(_, dir)| dir).collect()
}

/// Asks the kernel for a currently free TCP port on 127.0.0.1.
fn pick_free_port() -> Result<u16, PgTempError> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(with_context("binding 127.0.0.1:0 to pick a free port"))?;
    let port = listener
        .local_addr()
        .map_err(with_context("reading the picked port"))?
        .port();
    Ok(port)
}

/// The fixed settings block appended to postgresql.conf (everything except `port`).
fn base_config(
    durable: bool,
    extra_settings: &[(String, String)],
    sock: &Path,
) -> Result<String, PgTempError> {
    let sock = sock.to_str().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("socket directory {} is not valid UTF-8", sock.display()),
        )
    })?;
    let durability = if durable { "on" } else { "off" };
    let mut conf = String::from("\n# ---- added by tally (pgtemp) ----\n");
    let fixed: [(&str, String); 9] = [
        ("listen_addresses", quote_conf("127.0.0.1")),
        ("unix_socket_directories", quote_conf(sock)),
        ("max_connections", "200".to_owned()),
        ("shared_buffers", quote_conf("256MB")),
        ("fsync", durability.to_owned()),
        ("synchronous_commit", durability.to_owned()),
        ("full_page_writes", durability.to_owned()),
        ("jit", "off".to_owned()),
        ("log_min_messages", "warning".to_owned()),
    ];
    for (name, value) in fixed {
        let _ = writeln!(conf, "{name} = {value}");
    }
    for (name, value) in extra_settings {
        let value = if value.len() >= 2 && value.starts_with('\'') && value.ends_with('\'') {
            value.clone()
        } else {
            quote_conf(value)
        };
        let _ = writeln!(conf, "{name} = {value}");
    }
    Ok(conf)
}

/// Rejects setting names/values that could break or inject postgresql.conf lines.
fn validate_setting(name: &str, value: &str) -> Result<(), PgTempError> {
    let name_ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
    let value_ok = !value.contains(['\n', '\r', '\0']);
    if name_ok && value_ok {
        Ok(())
    } else {
        Err(PgTempError::Io(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid extra PostgreSQL setting {name:?} = {value:?}"),
        )))
    }
}

/// Quotes a postgresql.conf value as a string literal.
fn quote_conf(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// Percent-encodes everything except RFC 3986 unreserved characters.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for byte in s.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

/// Renders an argv for humans (single-quoting arguments that need it).
fn command_line(argv: &[OsString]) -> String {
    argv.iter()
        .map(|arg| {
            let s = arg.to_string_lossy();
            let plain = !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c));
            if plain {
                s.into_owned()
            } else {
                format!("'{}'", s.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Formats the searched paths for [`PgTempError::BinariesNotFound`].
fn display_paths(paths: &[PathBuf]) -> String {
    if paths.is_empty() {
        return "(no candidate directories)".to_owned();
    }
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The last `n` lines of `text`.
fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The last `lines` lines of the file at `path` (reads at most the final 64 KiB).
fn read_tail(path: &Path, lines: usize) -> io::Result<String> {
    const WINDOW: u64 = 64 * 1024;
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    let start = len.saturating_sub(WINDOW);
    file.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::new();
    file.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    // When starting mid-file, drop the (probably partial) first line.
    let whole: &str = if start > 0 {
        text.split_once('\n').map_or("", |(_, rest)| rest)
    } else {
        &text
    };
    Ok(last_lines(whole, lines))
}

/// Wraps an I/O error with a description of what was being done.
fn with_context(what: impl Into<String>) -> impl FnOnce(io::Error) -> io::Error {
    let what = what.into();
    move |err| io::Error::new(err.kind(), format!("{what}: {err}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{SocketAddr, TcpStream};
    use std::time::Duration;

    fn can_connect(port: u16) -> bool {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).is_ok()
    }

    #[test]
    fn start_stop_restart_drop() {
        let cluster = TempCluster::start(ClusterOptions::default())
            .unwrap_or_else(|err| panic!("starting temp cluster: {err}"));
        let dir = cluster.dir().to_path_buf();
        let port = cluster.port();
        assert!(dir.join("data").join("PG_VERSION").is_file());
        assert_eq!(
            cluster.url("tally"),
            format!("postgres://postgres@127.0.0.1:{port}/tally")
        );
        assert!(can_connect(port), "server log:\n{}", cluster.log_tail(20));

        cluster
            .stop("immediate")
            .unwrap_or_else(|err| panic!("stopping temp cluster: {err}"));
        assert!(
            !can_connect(port),
            "port {port} still accepts connections after stop"
        );

        cluster
            .restart_after_stop()
            .unwrap_or_else(|err| panic!("restarting temp cluster: {err}"));
        assert_eq!(cluster.port(), port);
        assert!(can_connect(port), "server log:\n{}", cluster.log_tail(20));

        drop(cluster);
        assert!(!dir.exists(), "{} was not removed on drop", dir.display());
        assert!(!can_connect(port), "server still running after drop");
    }
}
