//! A generational slab: stable small indices for allocations, so a relay
//! socket's id finds its allocation without hashing.

pub struct Slab<T> {
    entries: Vec<Entry<T>>,
    free: Vec<u32>,
    len: usize,
}

struct Entry<T> {
    generation: u32,
    value: Option<T>,
}

impl<T> Slab<T> {
    pub fn new() -> Self {
        Slab { entries: Vec::new(), free: Vec::new(), len: 0 }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Reserves a slot and returns (slot, generation) before the value exists.
    pub fn vacant(&mut self) -> (u32, u32) {
        match self.free.last() {
            Some(&s) => (s, self.entries[s as usize].generation),
            None => (self.entries.len() as u32, 0),
        }
    }

    /// Fills the slot `vacant` returned.
    pub fn insert(&mut self, value: T) -> u32 {
        self.len += 1;
        match self.free.pop() {
            Some(s) => {
                self.entries[s as usize].value = Some(value);
                s
            }
            None => {
                self.entries.push(Entry { generation: 0, value: Some(value) });
                (self.entries.len() - 1) as u32
            }
        }
    }

    pub fn remove(&mut self, slot: u32) -> Option<T> {
        let e = self.entries.get_mut(slot as usize)?;
        let v = e.value.take()?;
        e.generation = e.generation.wrapping_add(1);
        self.free.push(slot);
        self.len -= 1;
        Some(v)
    }

    #[inline]
    pub fn get(&self, slot: u32) -> Option<&T> {
        self.entries.get(slot as usize)?.value.as_ref()
    }

    #[inline]
    pub fn get_mut(&mut self, slot: u32) -> Option<&mut T> {
        self.entries.get_mut(slot as usize)?.value.as_mut()
    }

    /// The value in `slot` only if the slot still has `generation`.
    #[inline]
    pub fn get_gen_mut(&mut self, slot: u32, generation: u32) -> Option<&mut T> {
        let e = self.entries.get_mut(slot as usize)?;
        if e.generation != generation {
            return None;
        }
        e.value.as_mut()
    }

    /// The live values with their slots.
    pub fn slots(&self) -> impl Iterator<Item = (u32, &T)> {
        self.entries.iter().enumerate().filter_map(|(i, e)| Some((i as u32, e.value.as_ref()?)))
    }

    /// The live values, to change.
    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.entries.iter_mut().filter_map(|e| e.value.as_mut())
    }
}
