"""Progress bars on long loops (tqdm), shown only when stderr is a terminal, so logs and CI output stay clean."""
from tqdm import tqdm


def progress(iterable=None, total=None, desc=None, enabled=True, **options):
    """A tqdm bar over ``iterable`` (or updated by hand up to ``total``), drawn on stderr when it is a terminal
    and ``enabled`` (False on the ranks that are not the main one)."""
    return tqdm(iterable, total=total, desc=desc, disable=None if enabled else True, dynamic_ncols=True,
                mininterval=1.0, **options)
