"""The MPI layer: the one torch<->MPI boundary, the bucketed gradient reducer, and process grids."""
