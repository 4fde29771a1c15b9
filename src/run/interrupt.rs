//! Stopping a run early, on SIGINT (Ctrl-C) or SIGTERM, with a report of what finished.
//!
//! The first signal sets the run's [`Interrupt`]: the feeder hands out no more subjects, and
//! every node passes the records that reach it on without running its stage, so each
//! subject in flight stops at its next node. Stage calls already running finish (libtorch
//! cannot be stopped mid-call), and every file is written under a temporary name and then
//! renamed, so nothing half-written lands under a final name. The run then writes its report
//! for the subjects that finished, lists the others as not run, and the command exits with
//! 128 + the signal's number (130 for SIGINT, 143 for SIGTERM).
//!
//! A second signal exits at once, with the same codes: what the stage calls in progress had
//! not renamed yet stays under its hidden temporary name, and no report is written.

use std::sync::Arc;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tracing::warn;

/// A signal that stops a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// SIGINT: Ctrl-C on a terminal.
    Interrupt,
    /// SIGTERM: `kill`, a job scheduler, a container stopping.
    Terminate,
}

impl Signal {
    /// The signal's usual name.
    pub fn name(self) -> &'static str {
        match self {
            Signal::Interrupt => "SIGINT",
            Signal::Terminate => "SIGTERM",
        }
    }

    /// The exit status of a command it stopped: 128 + its number, as shells report it.
    pub fn exit_code(self) -> u8 {
        match self {
            Signal::Interrupt => 130,
            Signal::Terminate => 143,
        }
    }
}

/// Asks a run to stop taking subjects (see the module doc). Clones share one state; a fresh
/// one is never set until [`Interrupt::trigger`] or a signal [`Interrupt::listen`] caught.
#[derive(Clone, Debug)]
pub struct Interrupt(Arc<watch::Sender<Option<Signal>>>);

impl Default for Interrupt {
    fn default() -> Interrupt {
        Interrupt(Arc::new(watch::Sender::new(None)))
    }
}

impl Interrupt {
    /// Sets the interrupt as `signal` would; a second call keeps the first signal. Returns
    /// whether this call was the first.
    pub fn trigger(&self, signal: Signal) -> bool {
        self.0.send_if_modified(|set| {
            let first = set.is_none();
            if first {
                *set = Some(signal);
            }
            first
        })
    }

    /// The signal that set the interrupt, if one did.
    pub fn signal(&self) -> Option<Signal> {
        *self.0.borrow()
    }

    /// Waits until the interrupt is set (at once if it is).
    ///
    /// # Cancel safety
    /// Cancel safe: dropping the future loses nothing.
    pub async fn wait(&self) {
        let mut set = self.0.subscribe();
        // The sender lives in `self`, so the channel cannot close while this waits.
        let _ = set.wait_for(Option::is_some).await;
    }

    /// Catches SIGINT and SIGTERM from now on, for the rest of the process: the first sets
    /// the interrupt, a second exits the process at once with its [`Signal::exit_code`].
    ///
    /// # Errors
    /// If a signal handler cannot be installed.
    ///
    /// # Panics
    /// Outside a Tokio runtime (with its I/O driver enabled).
    pub fn listen(&self) -> std::io::Result<()> {
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut terminate = signal(SignalKind::terminate())?;
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                let caught = tokio::select! {
                    Some(()) = interrupt.recv() => Signal::Interrupt,
                    Some(()) = terminate.recv() => Signal::Terminate,
                    else => return,
                };
                if !this.trigger(caught) {
                    warn!(signal = caught.name(), "Second signal: exiting at once");
                    std::process::exit(caught.exit_code().into());
                }
                warn!(
                    signal = caught.name(),
                    "Interrupted: no new subjects; the stage calls in progress finish, then \
                     the report is written (send the signal again to exit at once)"
                );
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_first_signal_sticks_and_wakes_waiters() {
        let interrupt = Interrupt::default();
        assert_eq!(interrupt.signal(), None);
        let waiter = tokio::spawn({
            let interrupt = interrupt.clone();
            async move { interrupt.wait().await }
        });
        assert!(interrupt.trigger(Signal::Terminate));
        assert!(!interrupt.trigger(Signal::Interrupt));
        waiter.await.unwrap();
        assert_eq!(interrupt.signal(), Some(Signal::Terminate));
        assert_eq!(interrupt.signal().map(Signal::exit_code), Some(143));
    }
}
