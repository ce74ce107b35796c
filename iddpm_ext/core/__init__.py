"""The diffusion core below :mod:`iddpm_ext.gaussian_diffusion`: noise schedules
(:mod:`.schedules`), the per-timestep coefficient table (:mod:`.tables`), argument checks
(:mod:`.checks`) and how a sampling step runs, fused or eager (:mod:`.sampling`)."""
