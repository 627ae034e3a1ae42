//! Claims and their leases: `claim` (decided by [`super::claim::decide`]), `heartbeat`,
//! `release`, and the two ways a lease ends without a report (expiry, attempts exhausted),
//! which the sweep shares.

use uuid::Uuid;
use vm_task_types::{
    validate::parse_task_id,
    wire::{ClaimRequest, ClaimResponse, LeaseRequest, LeaseResponse},
    Claim, Task, TaskStatus, TimelineEvent, Timestamp,
};

use super::{
    check_consumer_id,
    claim::{decide, ClaimDecision},
    ConsumerService, WORKER,
};
use crate::{
    auth::Caller,
    http::{Request, Response},
    intents::{
        claim_outcome, settle_cancel, CancelIntent, CancelSettlement, ClaimIntent, ClaimOutcome,
        CANCEL_SETTLE_MARGIN_MS,
    },
    store::{apply_cancel_settlement, paced},
    AppError, Clock, Ids, KvStore,
};

impl<S: KvStore, B: KvStore, C: Clock, I: Ids> ConsumerService<'_, S, B, C, I> {
    pub(super) async fn claim(&self, raw_id: &str, request: &Request, caller: &Caller) -> Result<Response, AppError> {
        let id = parse_task_id("id", raw_id)?;
        let named = caller.named_server(request)?;
        let body: ClaimRequest = request.json()?;
        check_consumer_id(&body.consumer_id)?;
        let lease = self.lease_secs(body.lease_seconds);
        let mut task = self.tasks.require(id).await?;
        caller.check_server(&task.target_server)?;
        crate::auth::on_named_server(&task, named)?;
        let now = self.clock.now();
        match decide(&task, body.claim_id, now, self.config.max_attempts) {
            ClaimDecision::Refuse(status) => {
                self.unbuffer(&task.target_server, id).await?;
                return Err(AppError::conflict(format!("task {id} is {status}; it will not run"), status));
            }
            ClaimDecision::Repeat => {
                // The same claim again: its first response was lost. Nothing to write.
                let held = task.claim.clone().ok_or_else(|| AppError::Unavailable("claim vanished".into()))?;
                return Ok(Response::json(
                    200,
                    &ClaimResponse {
                        success: true,
                        claim_id: held.claim_id,
                        lease_expires_at: held.lease_expires_at,
                        task,
                    },
                ));
            }
            ClaimDecision::Busy { until } => {
                return Err(AppError::Conflict {
                    message: format!("task {id} is claimed until {until}"),
                    current_status: Some(task.status),
                    lease_expires_at: Some(until),
                });
            }
            ClaimDecision::GiveUp { lease_expired } => {
                if lease_expired {
                    self.expire_lease(&mut task, now);
                }
                self.give_up(&mut task, now).await?;
                return Err(AppError::conflict(task.error.clone().unwrap_or_default(), TaskStatus::Failed));
            }
            ClaimDecision::Grant { lease_expired } => {
                if lease_expired {
                    self.expire_lease(&mut task, now);
                }
            }
        }
        if task.event_at(TimelineEvent::Buffered).is_none() {
            // The daemon read the entry's buffering time in its listing; only a client that
            // does not send it costs a read of the entry. Clamped: it is a timeline note, and
            // the edge's clocks may differ by a few ms between locations.
            let buffered_at = match body.buffered_at {
                Some(at) => Some(at.max(task.created_at).min(now)),
                None => self.buffer.get(&task.target_server, id).await?.map(|entry| entry.buffered_at),
            };
            if let Some(at) = buffered_at {
                let note = format!("buffered for server {}", task.target_server);
                task.record(at, WORKER, TimelineEvent::Buffered, None, note);
            }
        }
        let claim_id = body.claim_id.unwrap_or_else(|| self.ids.random_uuid());
        let intent = ClaimIntent { claim_id, consumer_id: body.consumer_id.clone(), at: now };
        if self.config.kv_propagation_secs > 0 {
            // Across locations ([`crate::intents`]): the record read here may predate a claim
            // made elsewhere, and a standing cancel decides only once it is certain.
            if let Some(refusal) = self.unseen_claim(&task, now).await? {
                return Err(refusal);
            }
            if let Some(cancel) = self.tasks.cancel_intent(id).await? {
                return self.settle_for_claim(task, &cancel, now).await;
            }
            paced(&self.clock, || self.tasks.put_claim_intent(id, &intent)).await?;
        } else {
            // The claim's intent goes first, then the cancel's is read ([`crate::intents`]).
            paced(&self.clock, || self.tasks.put_claim_intent(id, &intent)).await?;
            if let Some(cancel) = self.tasks.cancel_intent(id).await? {
                return self.yield_to_cancel(task, &cancel, &body.consumer_id).await;
            }
        }
        task.attempts += 1;
        let claim = Claim {
            claim_id,
            consumer_id: body.consumer_id.clone(),
            claimed_at: now,
            lease_expires_at: now.plus_secs(lease),
        };
        task.claim = Some(claim.clone());
        let note = format!(
            "attempt {} of {}, lease until {}",
            task.attempts, self.config.max_attempts, claim.lease_expires_at
        );
        task.record(now, &body.consumer_id, TimelineEvent::Claimed, Some(TaskStatus::Processing), note);
        self.save(&task).await?;
        Ok(Response::json(
            200,
            &ClaimResponse { success: true, claim_id: claim.claim_id, lease_expires_at: claim.lease_expires_at, task },
        ))
    }

    /// A refusal when the last claim's intent is recent and the record read here does not show
    /// that claim's decision: this location may still hold the record from before it (KV's
    /// caches), and writing `processing` over it could undo a report made since (production
    /// model, seeds 1809 and 1822: `completed` overwritten by a re-claim from another
    /// location). Once the intent is older than the propagation window (and the margin), any
    /// record write that followed it is visible here: the claim is answered "held" until then.
    async fn unseen_claim(&self, task: &Task, now: Timestamp) -> Result<Option<AppError>, AppError> {
        let Some(previous) = self.tasks.claim_intent(task.id).await? else { return Ok(None) };
        let visible_at = previous.at.plus_secs(self.config.kv_propagation_secs).plus_millis(CANCEL_SETTLE_MARGIN_MS);
        if now >= visible_at || claim_outcome(task, &previous) != ClaimOutcome::InFlight {
            return Ok(None);
        }
        Ok(Some(AppError::Conflict {
            message: format!(
                "task {} was claimed at {} and its record here may not show that claim yet; claim again after {visible_at}",
                task.id, previous.at
            ),
            current_status: Some(task.status),
            lease_expires_at: Some(visible_at),
        }))
    }

    /// A claim (across locations) that found a standing cancel: the task does not run. Once
    /// the cancel is certain the claim settles it; until then it is answered "held" until the
    /// moment it will be ([`crate::intents::settle_cancel`]).
    async fn settle_for_claim(&self, task: Task, cancel: &CancelIntent, now: Timestamp) -> Result<Response, AppError> {
        let id = task.id;
        let settlement = settle_cancel(&task, cancel, now, self.config.kv_propagation_secs);
        if let CancelSettlement::Wait { until } = settlement {
            return Err(AppError::Conflict {
                message: format!("task {id} has a cancel request from its client; it will not run here (the cancel is final at {until})"),
                current_status: Some(task.status),
                lease_expires_at: Some(until),
            });
        }
        let task = apply_cancel_settlement(&self.tasks, &self.buffer, &self.clock, task, cancel, settlement).await?;
        Err(AppError::conflict(format!("task {id} is {}; it will not run", task.status), task.status))
    }

    /// A client cancelled the task while this claim was being decided: the task becomes
    /// cancelled with the client's event and ours, and the daemon gets 409 (it never runs).
    async fn yield_to_cancel(
        &self,
        mut task: Task,
        cancel: &CancelIntent,
        consumer_id: &str,
    ) -> Result<Response, AppError> {
        let id = task.id;
        task.claim = None;
        task.record(cancel.at, "client", TimelineEvent::Cancelled, Some(TaskStatus::Cancelled), &cancel.message);
        task.error = Some(cancel.message.clone());
        task.record(
            self.clock.now(),
            consumer_id,
            TimelineEvent::ClaimYielded,
            None,
            "the claim saw the client's cancel",
        );
        self.save(&task).await?;
        self.unbuffer(&task.target_server, id).await?;
        Err(AppError::conflict(
            format!("task {id} was cancelled by its client; it will not run"),
            TaskStatus::Cancelled,
        ))
    }

    pub(super) async fn heartbeat(
        &self,
        raw_id: &str,
        request: &Request,
        caller: &Caller,
    ) -> Result<Response, AppError> {
        let id = parse_task_id("id", raw_id)?;
        let named = caller.named_server(request)?;
        let body: LeaseRequest = request.json()?;
        let mut task = self.held(id, body.claim_id).await?;
        caller.check_server(&task.target_server)?;
        crate::auth::on_named_server(&task, named)?;
        let expires = self.clock.now().plus_secs(self.lease_secs(body.lease_seconds));
        if let Some(claim) = task.claim.as_mut() {
            claim.lease_expires_at = expires;
        }
        task.updated_at = self.clock.now();
        task.gen += 1;
        self.save(&task).await?;
        // Only a long command can be stopped while it runs; only its heartbeats pay the read.
        let cancel_requested = crate::api::is_long_command(&task) && self.tasks.cancel_intent(id).await?.is_some();
        Ok(Response::json(
            200,
            &LeaseResponse {
                success: true,
                task_id: id,
                status: task.status,
                lease_expires_at: Some(expires),
                cancel_requested,
            },
        ))
    }

    pub(super) async fn release(&self, raw_id: &str, request: &Request, caller: &Caller) -> Result<Response, AppError> {
        let id = parse_task_id("id", raw_id)?;
        let named = caller.named_server(request)?;
        let body: LeaseRequest = request.json()?;
        let mut task = self.held(id, body.claim_id).await?;
        caller.check_server(&task.target_server)?;
        crate::auth::on_named_server(&task, named)?;
        let actor = task.claim.as_ref().map(|c| c.consumer_id.clone()).unwrap_or_default();
        task.claim = None;
        // A released claim never started work, so it does not count as an attempt.
        task.attempts = task.attempts.saturating_sub(1);
        let reason = body.reason.clone().unwrap_or_else(|| "released by its consumer".into());
        task.record(self.clock.now(), &actor, TimelineEvent::Released, Some(TaskStatus::Pending), reason);
        self.save(&task).await?;
        self.ring(&task.target_server).await?;
        Ok(Response::json(
            200,
            &LeaseResponse {
                success: true,
                task_id: id,
                status: task.status,
                lease_expires_at: None,
                cancel_requested: false,
            },
        ))
    }

    /// The task, if `claim_id` holds it and it is still processing; 409 otherwise.
    async fn held(&self, id: Uuid, claim_id: Uuid) -> Result<Task, AppError> {
        let task = self.tasks.require(id).await?;
        if task.status != TaskStatus::Processing || !task.is_claimed_by(claim_id) {
            return Err(AppError::Conflict {
                message: format!("claim {claim_id} does not hold task {id} (it is {})", task.status),
                current_status: Some(task.status),
                lease_expires_at: task.claim.as_ref().map(|c| c.lease_expires_at),
            });
        }
        Ok(task)
    }

    /// Moves a processing task whose lease ended back to pending (in memory).
    pub(super) fn expire_lease(&self, task: &mut Task, now: Timestamp) {
        let holder = task.claim.take().map(|c| c.consumer_id).unwrap_or_default();
        let note = format!(
            "lease of {holder} expired without a report (attempt {} of {})",
            task.attempts, self.config.max_attempts
        );
        task.record(now, "sweeper", TimelineEvent::LeaseExpired, Some(TaskStatus::Pending), note);
    }

    /// Fails a task that used all its attempts, and drops its buffer entry.
    pub(super) async fn give_up(&self, task: &mut Task, now: Timestamp) -> Result<(), AppError> {
        let reason =
            format!("gave up after {} attempts: every lease expired without a report from the daemon", task.attempts);
        task.error = Some(reason.clone());
        task.claim = None;
        task.record(now, "sweeper", TimelineEvent::AttemptsExhausted, Some(TaskStatus::Failed), reason);
        self.save(task).await?;
        self.unbuffer(&task.target_server, task.id).await
    }

    fn lease_secs(&self, requested: Option<u64>) -> u64 {
        requested
            .unwrap_or(self.config.lease_default_secs)
            .clamp(self.config.lease_min_secs, self.config.lease_max_secs)
    }
}
