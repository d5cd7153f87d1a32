//! CPU reference backend (f32 compute; bf16 storage converted at the boundary).
