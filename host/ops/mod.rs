//! Operators, one module each: the CPU code, the GPU launch and the tests of an operator live
//! together in its file.
pub mod prescan;
