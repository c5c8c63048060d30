from lab.diff.run import main

raise SystemExit(main())
