//! turnctl: the operator tool for turnd.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use turnd::auth::{rest_password, rest_username};
use turnd::config::Seconds;

#[derive(Parser)]
#[command(name = "turnctl", version, about = "Operator tool for the turnd TURN relay")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print time-limited TURN credentials (TURN REST API, as prosody's mod_external_services computes them).
    Credentials {
        /// The shared secret.
        #[arg(long, conflicts_with = "secret_file", required_unless_present = "secret_file")]
        secret: Option<String>,
        /// File holding the shared secret(s); the first one signs.
        #[arg(long, value_name = "FILE")]
        secret_file: Option<PathBuf>,
        /// User part appended to the expiry (EXPIRY:USER).
        #[arg(long)]
        user: Option<String>,
        /// Validity, in seconds or with a unit (30m, 24h).
        #[arg(long, default_value = "24h")]
        ttl: String,
        /// TURN host to put in the URIs (turn:HOST:3478, turns:HOST:443).
        #[arg(long)]
        host: Option<String>,
        /// Print the TURN REST API JSON response.
        #[arg(long)]
        json: bool,
    },
    /// Generate a strong random shared secret.
    Secret,
}

fn read_first_secret(path: &PathBuf) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .ok_or_else(|| format!("{} holds no secret", path.display()))
}

fn json_str(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn main() -> ExitCode {
    match Cli::parse().cmd {
        Cmd::Credentials { secret, secret_file, user, ttl, host, json } => {
            let secret = match (secret, secret_file) {
                (Some(s), _) => s,
                (None, Some(f)) => match read_first_secret(&f) {
                    Ok(s) => s,
                    Err(e) => {
                        eprintln!("turnctl: {e}");
                        return ExitCode::from(2);
                    }
                },
                (None, None) => unreachable!("clap requires one of them"),
            };
            let ttl = match ttl.parse::<Seconds>() {
                Ok(t) if t.0 > 0 => t.0,
                _ => {
                    eprintln!("turnctl: --ttl: `{ttl}` is not a positive duration (e.g. 3600, 30m, 24h)");
                    return ExitCode::from(2);
                }
            };
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
            let username = rest_username(now + ttl, user.as_deref());
            let password = rest_password(secret.as_bytes(), &username);
            let uris: Vec<String> = match &host {
                Some(h) => vec![
                    format!("turn:{h}:3478?transport=udp"),
                    format!("turn:{h}:3478?transport=tcp"),
                    format!("turns:{h}:443?transport=tcp"),
                ],
                None => vec![],
            };
            if json {
                let u: Vec<String> = uris.iter().map(|u| json_str(u)).collect();
                println!(
                    "{{\"username\":{},\"password\":{},\"ttl\":{},\"uris\":[{}]}}",
                    json_str(&username),
                    json_str(&password),
                    ttl,
                    u.join(",")
                );
            } else {
                println!("username: {username}");
                println!("password: {password}");
                for u in uris {
                    println!("uri: {u}");
                }
            }
            ExitCode::SUCCESS
        }
        Cmd::Secret => {
            println!("{}", turnd::config::generate_secret());
            ExitCode::SUCCESS
        }
    }
}
