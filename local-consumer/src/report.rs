//! Fitting a task's report into what the API worker accepts.
//!
//! The worker refuses bodies over 64 KiB (`Limits::BODY_MAX_BYTES`), and a command can print
//! far more. A report keeps the head and the tail of a long `output` (and of a long error),
//! says `outputTruncated: true` and the full `outputBytes`, and is shrunk until its JSON,
//! escapes included, fits: a byte of control characters costs six in JSON, so capping the raw
//! text alone would not be enough. Pure functions, tested directly.

use vm_task_types::{validate::Limits, wire::UpdateStatusRequest};

/// The largest report body the daemon sends: the worker's limit less room for its framing.
pub const REPORT_MAX_BYTES: usize = Limits::BODY_MAX_BYTES - 1024;

/// Longest error message kept whole in a report.
const ERROR_MAX_BYTES: usize = 4096;

/// What fitting did to a report, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Fitted {
    /// The serialized size of the report as it will be sent.
    pub bytes: usize,
    /// The output's full size when it was cut.
    pub output_cut_from: Option<usize>,
    /// Retry notes dropped (only when even an empty output did not fit).
    pub retries_dropped: usize,
}

/// Shrinks `update` so that its JSON is at most `max_body` bytes, keeping at most
/// `max_output` bytes of `output` (head and tail) and [`ERROR_MAX_BYTES`] of each error.
pub fn fit(update: &mut UpdateStatusRequest, max_output: usize, max_body: usize) -> Fitted {
    let mut fitted = Fitted::default();
    if let Some(error) = update.error.as_mut() {
        *error = head_and_tail(error, ERROR_MAX_BYTES);
    }
    if let Some(message) = update.message.as_mut() {
        *message = head_and_tail(message, ERROR_MAX_BYTES);
    }
    for note in &mut update.retries {
        note.error = head_and_tail(&note.error, 512);
    }
    let original_output = update.result.as_mut().and_then(|r| {
        r.error = r.error.as_deref().map(|e| head_and_tail(e, ERROR_MAX_BYTES));
        r.output.take()
    });
    let mut keep = max_output;
    loop {
        if let (Some(result), Some(output)) = (update.result.as_mut(), original_output.as_deref()) {
            if output.len() > keep {
                result.output = Some(head_and_tail(output, keep));
                result.output_truncated = Some(true);
                result.output_bytes = Some(output.len() as u64);
                fitted.output_cut_from = Some(output.len());
            } else {
                result.output = Some(output.to_owned());
            }
        }
        let bytes = size(update);
        if bytes <= max_body {
            fitted.bytes = bytes;
            return fitted;
        }
        if keep == 0 {
            break;
        }
        // Shrink in proportion to the overshoot (escapes make bytes cost more than one), a
        // little more each time so that it ends.
        let scaled = (keep as u128 * max_body as u128 / bytes as u128) as usize;
        keep = scaled.min(keep.saturating_sub(512)).saturating_sub(256);
    }
    // Not even an empty output fits: the retry notes are what is left to cut.
    while size(update) > max_body && !update.retries.is_empty() {
        update.retries.remove(0);
        fitted.retries_dropped += 1;
    }
    fitted.bytes = size(update);
    fitted
}

fn size(update: &UpdateStatusRequest) -> usize {
    serde_json::to_vec(update).map(|v| v.len()).unwrap_or(usize::MAX)
}

/// `text` if it is at most `max` bytes; else its first and last `max / 2` bytes (on character
/// boundaries) around a line saying how much was left out.
pub fn head_and_tail(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut head = max / 2;
    while !text.is_char_boundary(head) {
        head -= 1;
    }
    let mut tail = text.len() - (max - max / 2);
    while !text.is_char_boundary(tail) {
        tail += 1;
    }
    format!("{}\n[… {} bytes omitted …]\n{}", &text[..head], tail - head, &text[tail..])
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;
    use vm_task_types::{wire::RetryNote, TaskResult, TaskStatus, Timestamp};

    use super::*;

    fn completed(output: String) -> UpdateStatusRequest {
        UpdateStatusRequest {
            status: TaskStatus::Completed,
            claim_id: Uuid::nil(),
            result: Some(TaskResult { output: Some(output), exit_code: Some(0), ..TaskResult::default() }),
            error: None,
            message: None,
            retries: Vec::new(),
        }
    }

    #[test]
    fn a_small_report_is_unchanged() {
        let mut update = completed("hello\n".into());
        let before = update.clone();
        let fitted = fit(&mut update, 32 * 1024, REPORT_MAX_BYTES);
        assert_eq!(update, before);
        assert_eq!(fitted.output_cut_from, None);
    }

    #[test]
    fn issue_11_75_kb_of_output_keeps_head_and_tail_and_says_so() {
        let output = format!("HEAD{}TAIL", "a".repeat(75_000));
        let mut update = completed(output.clone());
        let fitted = fit(&mut update, 32 * 1024, REPORT_MAX_BYTES);
        let result = update.result.as_ref().unwrap();
        let kept = result.output.as_deref().unwrap();
        assert!(kept.starts_with("HEADaaaa") && kept.ends_with("aaaaTAIL"), "{}", &kept[..20]);
        assert!(kept.len() <= 32 * 1024 + 64);
        assert_eq!(result.output_truncated, Some(true));
        assert_eq!(result.output_bytes, Some(output.len() as u64));
        assert_eq!(fitted.output_cut_from, Some(output.len()));
        assert!(serde_json::to_vec(&update).unwrap().len() <= REPORT_MAX_BYTES);
    }

    #[test]
    fn worst_case_escaping_still_fits_the_body_limit() {
        // Every byte a control character: six bytes each in JSON.
        let output: String = std::iter::repeat_n('\u{1}', 60_000).collect();
        let mut update = completed(output);
        let fitted = fit(&mut update, 60_000, REPORT_MAX_BYTES);
        assert!(fitted.bytes <= REPORT_MAX_BYTES, "{fitted:?}");
        assert_eq!(serde_json::to_vec(&update).unwrap().len(), fitted.bytes);
        let kept = update.result.unwrap().output.unwrap();
        assert!(kept.len() > 5_000, "kept as much as fits, not nothing: {}", kept.len());
    }

    #[test]
    fn long_errors_and_retry_notes_are_cut_too() {
        let mut update = UpdateStatusRequest {
            status: TaskStatus::Failed,
            claim_id: Uuid::nil(),
            result: None,
            error: Some(format!("start{}end", "e".repeat(200_000))),
            message: None,
            retries: (1..=200)
                .map(|attempt| RetryNote { at: Timestamp(0), attempt, error: "x".repeat(2_000) })
                .collect(),
        };
        let fitted = fit(&mut update, 32 * 1024, REPORT_MAX_BYTES);
        assert!(fitted.bytes <= REPORT_MAX_BYTES);
        let error = update.error.unwrap();
        assert!(error.starts_with("start") && error.ends_with("end") && error.len() < 5_000);
        assert!(fitted.retries_dropped > 0 && !update.retries.is_empty(), "{fitted:?}");
        assert_eq!(update.retries.last().unwrap().attempt, 200, "the latest notes are kept");
    }

    #[test]
    fn cuts_fall_on_character_boundaries() {
        let text = "é".repeat(1000);
        let cut = head_and_tail(&text, 101);
        assert!(cut.starts_with('é') && cut.ends_with('é'));
        assert!(cut.contains("bytes omitted"));
    }
}
