"""Notices from dependencies that say nothing to a gqa_tune user, dropped before those dependencies load."""

import logging


class _TorchaoCppNotice(logging.Filter):
    """torchao logs, at every import, that its C++ extensions were built for another torch and are skipped.
    gqa_tune uses none of them (NF4, int8 and the CPU int4 layout run on torch's own ops), so the notice is
    dropped where gqa_tune is imported before torchao (the ``gqa-tune`` command, Python); ``tune run``
    imports torchtune, and with it torchao, before any gqa_tune code runs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Skipping import of cpp extensions" not in record.getMessage()


logging.getLogger("torchao").addFilter(_TorchaoCppNotice())
