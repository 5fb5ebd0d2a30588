from string import Template

t = Template("zone $zone: $temp C")
print(t.substitute(zone="north", temp=21.5))
