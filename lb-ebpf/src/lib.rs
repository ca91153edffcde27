#![no_std]

// This file exists so that lb-user can name this crate as a build dependency.
