//! Concertim: the follow-ups billing handed over, on the Concertim queue, through the worker.

use std::sync::Arc;

use super::{dead_letter, with_retries};
use crate::{
    billing::Billing,
    bus::{Handler, Processed},
    class::{chain, ErrorClass, Fate, Label},
    concertim::{Work, Worker},
    config::BackoffSettings,
};

/// Shows follow-ups in Concertim.
pub struct ConcertimHandler<B> {
    worker: Arc<Worker<B>>,
    backoff: BackoffSettings,
}

impl<B> ConcertimHandler<B> {
    /// A handler over `worker`, retrying transient failures in process on `backoff`.
    pub fn new(worker: Arc<Worker<B>>, backoff: BackoffSettings) -> Self {
        Self { worker, backoff }
    }
}

impl<B: Billing + 'static> ConcertimHandler<B> {
    /// Refreshes a team's figures (debounced like the others) for a change no message reports:
    /// a settlement pass that billed its project. A failure is logged: the next change tries
    /// again.
    pub async fn refresh_team(&self, project: &crate::event::ProjectId) {
        let refresh = crate::concertim::Update::RefreshTeam { project: project.clone() };
        if let Err(e) = self.worker.apply(&refresh).await {
            tracing::warn!(project = %project, error = %e, "cannot refresh the team's figures after settlement");
        }
    }
}

impl<B: Billing + 'static> Handler for ConcertimHandler<B> {
    type Prepared = Result<Work, String>;

    fn prepare(&self, body: &[u8]) -> Self::Prepared {
        serde_json::from_slice(body).map_err(|e| format!("not Concertim work: {e}"))
    }

    fn lane_key(prepared: &Self::Prepared) -> Option<&str> {
        prepared.as_ref().ok().and_then(|w| w.project.as_ref()).map(|p| p.as_str())
    }

    fn span(prepared: &Self::Prepared) -> tracing::Span {
        let (message_id, event_type) =
            prepared.as_ref().map(|w| (w.message_id.as_str(), w.event_type.as_str())).unwrap_or_default();
        tracing::info_span!("concertim", message_id = %message_id, event_type = %event_type)
    }

    async fn process(self: &Arc<Self>, prepared: Self::Prepared, _redelivered: bool) -> Processed {
        let work = match prepared {
            Err(reason) => return dead_letter(ErrorClass::Invalid, reason),
            Ok(work) => Arc::new(work),
        };
        with_retries(&self.backoff, |_| {
            let worker = Arc::clone(&self.worker);
            let work = Arc::clone(&work);
            async move {
                let fate = match worker.apply_all(&work).await {
                    Ok(_) => Fate::Done(Label::Processed),
                    Err((what, e)) => {
                        Fate::failed(e.class(), format!("concertim: {}: {what}: {}", work.event_type, chain(&e)))
                    }
                };
                (fate, None)
            }
        })
        .await
    }
}
