//! The pid file: written once the listeners are bound, removed when the master exits. It
//! is how `zerocopy-server -s SIGNAL` finds the master.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

pub struct PidFile {
    path: PathBuf,
}

impl PidFile {
    pub fn write(path: &Path) -> Result<PidFile> {
        if let Some(old) = read(path).ok().filter(|p| alive(*p)) {
            if old != std::process::id() as i32 {
                log::warn!(
                    "pid file {} names a running process {old}; overwriting",
                    path.display()
                );
            }
        }
        let tmp = path.with_extension("pid.tmp");
        std::fs::write(&tmp, format!("{}\n", std::process::id()))
            .with_context(|| format!("cannot write pid file {}", tmp.display()))?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("cannot write pid file {}", path.display()))?;
        Ok(PidFile {
            path: path.to_path_buf(),
        })
    }

    pub fn remove(self) {
        if read(&self.path).ok() == Some(std::process::id() as i32) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    /// Binary upgrade: this master's pid file becomes `<path>.oldbin`, as nginx does.
    pub fn rename_oldbin(&mut self) {
        let old = oldbin(&self.path);
        if std::fs::rename(&self.path, &old).is_ok() {
            self.path = old;
        }
    }

    /// The upgrade failed: back to the plain name.
    pub fn restore_name(&mut self, original: &Path) {
        if self.path != original && std::fs::rename(&self.path, original).is_ok() {
            self.path = original.to_path_buf();
        }
    }
}

fn oldbin(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".oldbin");
    PathBuf::from(s)
}

pub fn read(path: &Path) -> Result<i32> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read pid file {}", path.display()))?;
    match text.trim().parse::<i32>() {
        Ok(pid) if pid > 0 => Ok(pid),
        _ => bail!(
            "pid file {} does not hold a pid: {:?}",
            path.display(),
            text.trim()
        ),
    }
}

fn alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}
