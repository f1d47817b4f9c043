from services.common.server import main
from services.router.app import build

main("router", build)
