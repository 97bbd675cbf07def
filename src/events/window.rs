//! The bookkeeping of one partition's worker when it processes several records at once: records of DIFFERENT
//! keys (batches) may run side by side, records of one key run strictly in offset order, and the offset that may be
//! committed is the first one not yet finished — never past an unfinished record (defect 16).

use std::collections::{BTreeSet, HashSet};

/// Records of one partition between "received" and "finished".
#[derive(Debug, Default)]
pub(crate) struct KeyedWindow {
    /// Offsets received and not finished (running or waiting), in order.
    pending: BTreeSet<i64>,
    /// Keys with a record running.
    busy: HashSet<Vec<u8>>,
    /// The offset after the last record received.
    next_offset: Option<i64>,
}

impl KeyedWindow {
    /// Takes `offset` in; true when a record of `key` may start now (no earlier record of that key is running).
    pub(crate) fn admit(&mut self, offset: i64, key: &[u8]) -> bool {
        self.pending.insert(offset);
        self.next_offset = Some(self.next_offset.map_or(offset + 1, |n| n.max(offset + 1)));
        self.busy.insert(key.to_vec())
    }

    /// Whether a record of `key` could start now.
    pub(crate) fn is_free(&self, key: &[u8]) -> bool {
        !self.busy.contains(key)
    }

    /// Marks the waiting record of `key` as started (after `is_free` said so).
    pub(crate) fn start(&mut self, key: &[u8]) {
        self.busy.insert(key.to_vec());
    }

    /// The record at `offset` with `key` finished.
    pub(crate) fn finish(&mut self, offset: i64, key: &[u8]) {
        self.pending.remove(&offset);
        self.busy.remove(key);
    }

    /// The offset to commit: the first unfinished one, or the one after everything received; `None` before any.
    pub(crate) fn committable(&self) -> Option<i64> {
        self.pending.first().copied().or(self.next_offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn different_keys_run_together_and_one_key_waits_its_turn() {
        let mut w = KeyedWindow::default();
        assert!(w.admit(10, b"a"));
        assert!(w.admit(11, b"b"));
        assert!(
            !w.admit(12, b"a"),
            "a second record of a waits for the first"
        );
        assert!(!w.is_free(b"b"));
        w.finish(10, b"a");
        assert!(w.is_free(b"a"));
        w.start(b"a");
        assert!(!w.is_free(b"a"));
    }

    #[test]
    fn the_commit_never_passes_an_unfinished_record() {
        let mut w = KeyedWindow::default();
        assert_eq!(w.committable(), None);
        w.admit(5, b"a");
        w.admit(6, b"b");
        w.admit(7, b"c");
        w.finish(6, b"b");
        w.finish(7, b"c");
        assert_eq!(w.committable(), Some(5), "5 is still running");
        w.finish(5, b"a");
        assert_eq!(w.committable(), Some(8), "everything received is finished");
    }

    #[test]
    fn a_waiting_record_holds_the_commit_back() {
        let mut w = KeyedWindow::default();
        w.admit(1, b"a");
        assert!(!w.admit(2, b"a"));
        w.admit(3, b"b");
        w.finish(1, b"a");
        w.finish(3, b"b");
        assert_eq!(w.committable(), Some(2), "offset 2 has not run yet");
    }
}
