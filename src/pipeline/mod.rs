//! The data path shared by backup, restore and prune: chunking, packing
//! (compress, seal, upload) and reading blobs and trees back.

pub mod blobs;
pub mod buffers;
pub mod chunker;
pub mod packer;
pub mod tree;
