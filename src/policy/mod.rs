//! Pure policy compilation.
