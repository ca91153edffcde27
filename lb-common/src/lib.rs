//! The contract between the datapath (`lb-ebpf`) and the agent (`lb-user`): map names, keys and
//! values. Every type is `#[repr(C)]` with explicit padding and a compile-time size check, so the
//! two sides and `bpftool` (through BTF) read the same bytes. Fields holding network-order values
//! end in `_be`.
#![no_std]
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]

pub mod addr;
pub mod maps;
