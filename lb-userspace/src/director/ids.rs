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
}
