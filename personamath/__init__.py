"""PersonaMath: persona-driven data augmentation for math reasoning (Luo et al. 2024), reimplemented."""
