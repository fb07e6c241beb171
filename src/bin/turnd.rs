//! turnd: the TURN/STUN relay server.

use std::process::ExitCode;

use clap::Parser;

use turnd::cli::turnd::Args;
use turnd::config::{self, Overrides};
use turnd::net::preflight;

fn main() -> ExitCode {
    // Started by a running turnd's upgrade: its end of the handover (the
    // running relay serves on if this process refuses or fails).
    let incoming = turnd::net::handover::Incoming::from_env().map(std::rc::Rc::new);
    let a = Args::parse();
    let ov = Overrides {
        realm: a.realm,
        listen: a.listen,
        relay_ip: a.relay_ip,
        external_ip: a.external_ip,
        ports: a.ports,
        secret_file: a.secret_file,
        allow_peers: a.allow_peer,
        log_level: a.log_level,
        log_format: a.log_format,
        threads: a.threads,
    };
    // --file-only checks the file alone: it reads no file the config names
    // (secret, admin token) and creates none, since those are another host's.
    let reads = if a.file_only { config::Reads::FileOnly } else { config::Reads::Host };
    let mut cfg = match config::load_reading(a.config.as_deref(), &ov.clone(), reads) {
        Ok(c) => c,
        Err(e) => {
            if let Some(i) = &incoming {
                i.refuse(&format!("configuration error: {e:#}"));
            }
            return config_error(&e);
        }
    };
    if !a.file_only {
        let mode = match (a.check_config, &incoming) {
            (true, _) => preflight::Mode::Check,
            (false, Some(_)) => preflight::Mode::Upgrade,
            (false, None) => preflight::Mode::Start,
        };
        match preflight::check(&cfg, mode, unix_now()) {
            Ok(notes) => cfg.notes.extend(notes),
            Err(e) => {
                let e = anyhow::Error::from(e);
                if let Some(i) = &incoming {
                    i.refuse(&format!("configuration error: {e:#}"));
                }
                return config_error(&e);
            }
        }
    }
    if a.check_config {
        for n in &cfg.notes {
            eprintln!("turnd: warning: {n}");
        }
        println!("configuration ok");
        return ExitCode::SUCCESS;
    }
    let set_log = init_logging(&cfg.log_level, cfg.log_json);
    for n in &cfg.notes {
        tracing::warn!("{n}");
    }
    raise_fd_limit(cfg.core.total_quota as u64 + cfg.max_connections as u64);
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("turnd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let local = tokio::task::LocalSet::new();
    let reload = turnd::net::Reload { path: a.config.clone(), overrides: ov, set_log };
    let r = local.block_on(&rt, turnd::net::run(cfg, reload, incoming.clone()));
    if let (Err(e), Some(i)) = (&r, &incoming) {
        i.refuse(&format!("{e:#}"));
    }
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<config::ConfigError>().is_some() => {
            tracing::error!("configuration error: {e:#}");
            config_error(&e)
        }
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("turnd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A configuration turnd cannot run: said on stderr, exit status 2.
fn config_error(e: &anyhow::Error) -> ExitCode {
    eprintln!("turnd: configuration error: {e:#}");
    ExitCode::from(2)
}

fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// Installs the subscriber; returns how to change level and format on reload.
fn init_logging(level: &str, json: bool) -> turnd::net::SetLog {
    use std::io::IsTerminal as _;
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::{fmt, reload, EnvFilter, Layer};
    let (filter, level_handle) = reload::Layer::new(EnvFilter::new(level));
    let ansi = std::io::stderr().is_terminal();
    // Text or JSON lines on stderr; boxed so a reload can swap one for the other.
    fn output<S>(json: bool, ansi: bool) -> Box<dyn Layer<S> + Send + Sync>
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        if json {
            // No span fields: a span opened before a switch from text would
            // lack the JSON formatter's record of them.
            fmt::layer().json().with_current_span(false).with_span_list(false).with_writer(std::io::stderr).boxed()
        } else {
            fmt::layer().with_writer(std::io::stderr).with_ansi(ansi).boxed()
        }
    }
    let (out, format_handle) = reload::Layer::new(output(json, ansi));
    tracing_subscriber::registry().with(filter).with(out).init();
    let current = std::cell::Cell::new(json);
    Box::new(move |level: &str, new_json: bool| {
        match EnvFilter::try_new(level) {
            Ok(f) => {
                if let Err(e) = level_handle.reload(f) {
                    tracing::warn!("log level not changed: {e}");
                }
            }
            Err(e) => tracing::warn!("log level `{level}` not applied: {e}"),
        }
        if new_json != current.get() {
            match format_handle.reload(output(new_json, ansi)) {
                Ok(()) => {
                    current.set(new_json);
                    tracing::info!(format = if new_json { "json" } else { "text" }, "log format changed");
                }
                Err(e) => tracing::warn!("log format not changed: {e}"),
            }
        }
    })
}

/// One relay socket per allocation and one descriptor per TCP/TLS connection:
/// raise the soft open-files limit to the hard one, and say when even that
/// cannot hold the configured quotas (allocations past it get 508).
fn raise_fd_limit(wanted: u64) {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
    }
    let limit = lim.rlim_cur;
    let reserve = turnd::net::relay::FD_RESERVE as u64;
    if limit < wanted + reserve {
        tracing::warn!(
            open_files_limit = limit,
            needed = wanted + reserve,
            "the open-files limit is below limits.total_quota + limits.max_connections + {reserve} descriptors kept for listeners, metrics and reloads: allocations and connections past it get 508 (raise LimitNOFILE / ulimit -n)"
        );
    } else {
        tracing::debug!(open_files_limit = limit, "open-files limit");
    }
}
