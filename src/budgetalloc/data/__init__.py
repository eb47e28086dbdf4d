"""The trial/population contract, file readers, fixed row blocks, seeded samples, public datasets."""
