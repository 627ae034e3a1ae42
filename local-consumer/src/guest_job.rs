//! A long command's life in the guest: the files it keeps and the short commands that start,
//! watch and stop it.
//!
//! Arrakis ends a blocking command call after 30 s (BEHAVIOR §2.9), so a command allowed longer
//! runs detached: its text is uploaded to `/tmp/vmtask-<task id>.sh`, and a non-blocking call
//! starts `setsid bash` on it in the background with output in `.out`, its pid (which is also
//! its process group, thanks to `setsid`) in `.pid`, and its exit status in `.exit` once it
//! ends. The daemon then polls `.exit` with short blocking calls. The names derive from the
//! task id alone, so a daemon that restarts mid-command finds the job the previous process
//! started (`.pid` exists) and watches it instead of starting it again. Stopping it signals the
//! whole process group, so the command's own children go too. Pure text, tested here; the
//! executor makes the calls.

use uuid::Uuid;

/// The files of one task's job in the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestJob {
    base: String,
}

impl GuestJob {
    pub fn for_task(task_id: Uuid) -> Self {
        Self { base: format!("/tmp/vmtask-{task_id}") }
    }

    /// Where the command's text is uploaded (absolute: Arrakis uses it as given).
    pub fn script_path(&self) -> String {
        format!("{}.sh", self.base)
    }

    /// The non-blocking call that starts the job. `setsid` makes the command's shell a
    /// process-group leader (a background child of a non-interactive bash is not one, so
    /// `setsid` does not fork and `$!` is that leader's pid).
    pub fn start_command(&self) -> String {
        let b = &self.base;
        format!("setsid bash {b}.sh > {b}.out 2>&1 & echo $! > {b}.pid; wait $!; echo $? > {b}.exit")
    }

    /// Prints the job's pid, or fails when it was never started.
    pub fn read_pid_command(&self) -> String {
        format!("cat {}.pid", self.base)
    }

    /// Prints the exit status, or fails while the job runs.
    pub fn read_exit_command(&self) -> String {
        format!("cat {}.exit", self.base)
    }

    pub fn read_output_command(&self) -> String {
        format!("cat {}.out", self.base)
    }

    /// Stops the job's whole process group.
    pub fn stop_command(pid: u32) -> String {
        format!("kill -TERM -- -{pid}")
    }

    /// Removes the script and the output once reported; `.pid` and `.exit` stay (a few
    /// bytes, gone at the VM's next cold boot) so that a retried task finds the job finished
    /// rather than starting it again.
    pub fn cleanup_command(&self) -> String {
        let b = &self.base;
        format!("rm -f {b}.sh {b}.out")
    }
}

/// A pid or exit status as `cat` printed it: one decimal number. Anything else (an empty
/// file caught mid-write, say) is `None`.
pub fn parse_number<T: std::str::FromStr>(text: &str) -> Option<T> {
    text.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_derive_from_the_task_id_alone() {
        let id = Uuid::from_u128(0x0193_7a2e_7000_7000_8000_0000_0000_0001);
        let job = GuestJob::for_task(id);
        assert_eq!(job, GuestJob::for_task(id), "a restarted daemon finds the same files");
        assert_eq!(job.script_path(), format!("/tmp/vmtask-{id}.sh"));
        assert_eq!(
            job.start_command(),
            format!(
                "setsid bash /tmp/vmtask-{id}.sh > /tmp/vmtask-{id}.out 2>&1 & echo $! > /tmp/vmtask-{id}.pid; \
                 wait $!; echo $? > /tmp/vmtask-{id}.exit"
            )
        );
        assert_eq!(GuestJob::stop_command(42), "kill -TERM -- -42");
    }

    #[test]
    fn numbers_are_read_whole_or_not_at_all() {
        assert_eq!(parse_number::<i32>("0\n"), Some(0));
        assert_eq!(parse_number::<i32>("143\n"), Some(143));
        assert_eq!(parse_number::<u32>(""), None, "a file caught mid-write");
        assert_eq!(parse_number::<u32>("cat: x: No such file or directory\n"), None);
    }
}
