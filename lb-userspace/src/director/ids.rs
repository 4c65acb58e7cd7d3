//! Free-list allocation of the small integer ids that index the maps.

use anyhow::{bail, Result};

/// Free-list allocator for small integer ids (service stats slots, backend slots).
#[derive(Debug, Clone)]
pub struct Ids {
    next: u32,
    max: u32,
    free: Vec<u32>,
}

impl Ids {
    pub fn new(first: u32, max: u32) -> Self {
        Self {
            next: first,
            max,
            free: Vec::new(),
        }
    }
    pub fn alloc(&mut self, what: &str) -> Result<u32> {
        if let Some(id) = self.free.pop() {
            return Ok(id);
        }
        if self.next >= self.max {
            bail!("too many {what} (limit {})", self.max);
        }
        self.next += 1;
        Ok(self.next - 1)
    }
    pub fn release(&mut self, id: u32) {
        self.free.push(id);
    }
    /// Take `id` out of the pool (it is in use by an adopted data plane).
    pub fn reserve(&mut self, id: u32) {
        if id >= self.next {
            self.free.extend(self.next..id);
            self.next = id + 1;
        } else {
            self.free.retain(|&f| f != id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_ids_are_never_handed_out() {
        let mut ids = Ids::new(1, 10);
        ids.reserve(3);
        ids.reserve(1);
        let got: Vec<u32> = (0..7).map(|_| ids.alloc("x").unwrap()).collect();
        assert!(!got.contains(&1) && !got.contains(&3), "{got:?}");
        assert!(
            ids.alloc("x").is_err(),
            "9 ids in 1..10: 2 reserved, 7 handed out"
        );
    }
}
