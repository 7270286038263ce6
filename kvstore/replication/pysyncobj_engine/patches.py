"""Process-wide changes to pysyncobj, applied once when the engine package is imported.

1. `pysyncobj.pickle.__protocol = 4`: log entries hold our bytes without protocol 2's
   latin-1 blow-up (a 26.6 KB batch became 44.5 KB).
2. `pysyncobj.syncobj.createJournal` is wrapped so a `Journal` instance passed as
   `journalFile` is used as is (there is no public journal seam).
"""

from __future__ import annotations

from typing import Any

import pysyncobj.pickle as _pysyncobj_pickle
import pysyncobj.syncobj as _pysyncobj_syncobj
from pysyncobj.journal import Journal

setattr(_pysyncobj_pickle, "__protocol", 4)  # a dunder module global: setattr is the only spelling
_library_create_journal = _pysyncobj_syncobj.createJournal


def _create_journal(journal_file: Any) -> Any:
    return journal_file if isinstance(journal_file, Journal) else _library_create_journal(journal_file)


_pysyncobj_syncobj.createJournal = _create_journal
