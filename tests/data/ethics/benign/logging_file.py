import logging

logging.basicConfig(filename="run.log", level=logging.INFO)
log = logging.getLogger("opt")
log.info("started with %d variables", 14)
