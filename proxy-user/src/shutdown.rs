//! Process lifecycle signals: SIGTERM asks for a graceful drain, SIGINT (or a
//! second SIGTERM) for a fast exit. Owns the signal handlers; everyone else
//! watches a [`Shutdown`].

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

/// Where the process is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Running,
    /// Stop taking new work; finish what is in flight within the grace period.
    Draining,
    /// Stop now.
    Stopping,
}

/// A cloneable view of the process phase.
#[derive(Debug, Clone)]
pub struct Shutdown {
    rx: watch::Receiver<Phase>,
}

/// The sending side, for signal handlers and tests.
#[derive(Debug, Clone)]
pub struct ShutdownTrigger {
    tx: watch::Sender<Phase>,
}

impl ShutdownTrigger {
    pub fn set(&self, phase: Phase) {
        self.tx.send_if_modified(|p| {
            let advance = phase > *p;
            if advance {
                *p = phase;
            }
            advance
        });
    }
}

pub fn channel() -> (ShutdownTrigger, Shutdown) {
    let (tx, rx) = watch::channel(Phase::Running);
    (ShutdownTrigger { tx }, Shutdown { rx })
}

impl Shutdown {
    pub fn phase(&self) -> Phase {
        *self.rx.borrow()
    }

    /// Resolves once the phase is at least `phase`.
    pub async fn reached(&self, phase: Phase) {
        let mut rx = self.rx.clone();
        let _ = rx.wait_for(|p| *p >= phase).await;
    }
}

/// Installs SIGTERM/SIGINT handlers that drive `trigger`.
pub fn install_signal_handlers(trigger: ShutdownTrigger) -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        let mut terms = 0;
        loop {
            tokio::select! {
                _ = term.recv() => {
                    terms += 1;
                    if terms == 1 {
                        tracing::info!("SIGTERM: draining (send SIGTERM again or SIGINT to stop at once)");
                        trigger.set(Phase::Draining);
                    } else {
                        trigger.set(Phase::Stopping);
                    }
                }
                _ = int.recv() => {
                    tracing::info!("SIGINT: stopping");
                    trigger.set(Phase::Stopping);
                }
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn phases_only_move_forward() {
        let (trigger, shutdown) = channel();
        trigger.set(Phase::Stopping);
        trigger.set(Phase::Draining);
        assert_eq!(shutdown.phase(), Phase::Stopping);
        shutdown.reached(Phase::Draining).await;
    }
}
