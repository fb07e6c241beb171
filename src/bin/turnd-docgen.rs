//! turnd-docgen: man pages and shell completions for turnd and turnctl,
//! rendered from the clap definitions the two programs parse (`turnd::cli`).
//!
//!   turnd-docgen OUT_DIR
//!
//! writes OUT_DIR/man/turnd.1, turnctl.1 and turnctl-SUBCOMMAND.1, and
//! OUT_DIR/completions/bash/{turnd,turnctl}, zsh/_{turnd,turnctl} and
//! fish/{turnd,turnctl}.fish. A build-time tool for packaging
//! (deploy/debian/build-deb.sh): turnd and turnctl themselves carry none of
//! this code.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap_complete::Shell;

fn write(path: &Path, bytes: &[u8]) -> Result<(), String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    std::fs::write(path, bytes).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn man_page(cmd: clap::Command) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    clap_mangen::Man::new(cmd).render(&mut out).map_err(|e| format!("cannot render a man page: {e}"))?;
    Ok(out)
}

fn generate(out: &Path) -> Result<Vec<PathBuf>, String> {
    let mut written = Vec::new();
    for cmd in [turnd::cli::turnd::command(), turnd::cli::turnctl::command()] {
        let name = cmd.get_name().to_owned();
        let path = out.join("man").join(format!("{name}.1"));
        write(&path, &man_page(cmd.clone())?)?;
        written.push(path);
        // One page per subcommand (turnctl-check(1), ...), as git does.
        for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
            // clap takes 'static names; this one-shot program can leak a few.
            let sub_name: &'static str = Box::leak(format!("{name}-{}", sub.get_name()).into_boxed_str());
            let path = out.join("man").join(format!("{sub_name}.1"));
            write(&path, &man_page(sub.clone().name(sub_name).version(env!("CARGO_PKG_VERSION")))?)?;
            written.push(path);
        }
        for (shell, dir, file) in [
            (Shell::Bash, "bash", name.clone()),
            (Shell::Zsh, "zsh", format!("_{name}")),
            (Shell::Fish, "fish", format!("{name}.fish")),
        ] {
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut cmd.clone(), &name, &mut buf);
            let path = out.join("completions").join(dir).join(file);
            write(&path, &buf)?;
            written.push(path);
        }
    }
    Ok(written)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [out] = args.as_slice() else {
        eprintln!("usage: turnd-docgen OUT_DIR   (man pages and shell completions for turnd and turnctl)");
        return ExitCode::from(2);
    };
    match generate(Path::new(out)) {
        Ok(files) => {
            for f in files {
                println!("{}", f.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("turnd-docgen: {e}");
            ExitCode::FAILURE
        }
    }
}
