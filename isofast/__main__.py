from isofast.cli import main

raise SystemExit(main())
