"""Mistakes a user makes with the data pipeline, for the error tests."""

from torch.utils.data import DataLoader

from runner.data import RegressionDataset


def regression_loader(**kwargs) -> DataLoader:
    """A DataLoader where a dataset belongs (its loader options belong in data.*)."""
    return DataLoader(RegressionDataset(**kwargs), batch_size=8)


def broken_collate():
    def collate(samples):
        raise ValueError("masks need lengths")

    return collate
