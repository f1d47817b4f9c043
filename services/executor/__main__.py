from services.common.server import main
from services.executor.app import build

main("executor", build)
