from services.common.server import main
from services.telemetry.app import build

main("telemetry", build)
