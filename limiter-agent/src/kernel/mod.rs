//! Everything that touches the kernel side: the XDP object's programs and maps.

pub mod clock;
