//! Bounded retry of transient errors, with exponential backoff.
//!
//! Only errors of class `transient` are retried (EINTR, EAGAIN, ETIMEDOUT, and EIO on a read:
//! see [`ErrorClass::from_errno`]); every other error is returned at once. A failed fsync is never
//! transient, so it is never retried and trusted. Each retry is logged with the error; once the
//! attempts or the time budget run out, the last error is returned (class `transient`, exit code
//! 3: the transfer stays resumable). A signal ends the wait at once.

use std::time::{Duration, Instant};

use crate::error::{ErrorClass, Result};

/// How hard to retry a transient error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1: never retry).
    pub attempts: u32,
    /// The most time to spend on one operation's retries, waits included.
    pub max_time: Duration,
    /// The first wait; each later one doubles, up to [`RetryPolicy::MAX_DELAY`].
    pub first_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> RetryPolicy {
        RetryPolicy {
            attempts: 8,
            max_time: Duration::from_secs(60),
            first_delay: Duration::from_millis(50),
        }
    }
}

impl RetryPolicy {
    /// The longest single wait between two attempts.
    pub const MAX_DELAY: Duration = Duration::from_secs(10);

    /// Never retry.
    pub fn none() -> RetryPolicy {
        RetryPolicy {
            attempts: 1,
            ..RetryPolicy::default()
        }
    }

    /// Run `f` (`what` names the operation in logs) until it succeeds, fails with an error that is
    /// not transient, or the attempts or time run out.
    pub fn run<T>(&self, what: &str, mut f: impl FnMut() -> Result<T>) -> Result<T> {
        let start = Instant::now();
        let mut delay = self.first_delay;
        let mut attempt = 1;
        loop {
            match f() {
                Ok(v) => {
                    if attempt > 1 {
                        log::info!("{what}: succeeded on attempt {attempt}");
                    }
                    return Ok(v);
                }
                Err(e) if e.class != ErrorClass::Transient => return Err(e),
                Err(e) => {
                    let spent = start.elapsed();
                    if attempt >= self.attempts || spent + delay > self.max_time {
                        return Err(e.context(format!(
                            "gave up after {attempt} attempt(s) in {:.1} s (--retries {}, \
                             --retry-time {} s)",
                            spent.as_secs_f64(),
                            self.attempts,
                            self.max_time.as_secs()
                        )));
                    }
                    log::warn!(
                        "{e}: transient, retrying {what} in {} ms (attempt {} of {})",
                        delay.as_millis(),
                        attempt + 1,
                        self.attempts
                    );
                    crate::stop::sleep(delay)?;
                    delay = (delay * 2).min(Self::MAX_DELAY);
                    attempt += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use std::cell::Cell;
    use std::io;
    use std::path::Path;

    fn err(errno: i32, op: &str) -> Error {
        Error::io(op, Path::new("/f"), io::Error::from_raw_os_error(errno))
    }

    fn quick(attempts: u32) -> RetryPolicy {
        RetryPolicy {
            attempts,
            max_time: Duration::from_secs(5),
            first_delay: Duration::from_millis(1),
        }
    }

    #[test]
    fn a_read_that_succeeds_when_repeated_is_retried() {
        let calls = Cell::new(0);
        let r = quick(4).run("read", || {
            calls.set(calls.get() + 1);
            if calls.get() < 3 {
                Err(err(libc::EIO, "read"))
            } else {
                Ok(7)
            }
        });
        assert_eq!(r.unwrap(), 7);
        assert_eq!(calls.get(), 3);
    }

    #[test]
    fn retries_are_bounded_by_attempts_and_time() {
        let calls = Cell::new(0);
        let e = quick(3)
            .run("read", || -> Result<()> {
                calls.set(calls.get() + 1);
                Err(err(libc::EAGAIN, "read"))
            })
            .unwrap_err();
        assert_eq!(calls.get(), 3);
        assert_eq!(e.class, ErrorClass::Transient);
        assert!(e.message.contains("gave up after 3 attempt"), "{e}");
        let calls = Cell::new(0);
        let p = RetryPolicy {
            attempts: 1000,
            max_time: Duration::from_millis(30),
            first_delay: Duration::from_millis(10),
        };
        let _ = p.run("read", || -> Result<()> {
            calls.set(calls.get() + 1);
            Err(err(libc::ETIMEDOUT, "read"))
        });
        // 10 + 20 ms fit in 30 ms, the next 40 ms wait does not.
        assert_eq!(calls.get(), 2);
    }

    #[test]
    fn permanent_errors_and_failed_fsyncs_are_not_retried() {
        for e in [
            err(libc::ENOSPC, "write"),
            err(libc::EACCES, "open"),
            err(libc::EIO, "fsync"),
            err(libc::EIO, "write"),
        ] {
            let calls = Cell::new(0);
            let got = quick(5)
                .run("op", || -> Result<()> {
                    calls.set(calls.get() + 1);
                    Err(e.clone())
                })
                .unwrap_err();
            assert_eq!(calls.get(), 1, "{e}");
            assert_eq!(got, e);
        }
    }
}
